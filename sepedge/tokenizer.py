"""A `tokenizers` tokenizer rebuilt from a GGUF vocabulary."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models

from . import vocab as V
from .errors import SepedgeError


def build_tokenizer(tokens: Sequence[str], token_types: Sequence[int], model: str, pre: str | None,
                    merges: Sequence[str] | None = None) -> Tokenizer:
    """The HF tokenizer equivalent to a GGUF `gpt2` vocabulary."""
    if model != "gpt2":
        raise SepedgeError(f"tokenizer model {model!r} is not supported yet (supported: gpt2)")
    p = V.PRE_TOKENIZERS.get(pre or "")
    if p is None:
        warnings.warn(f"unknown pre-tokenizer {pre!r}; using GPT-2's, which may split text differently", stacklevel=2)
        p = V.PRE_TOKENIZERS["gpt-2"]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    pairs = []
    for m in merges or []:
        left, sep, right = m.partition(" ")
        if not sep:
            raise SepedgeError(f"malformed BPE merge {m!r}")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=p.ignore_merges))
    if (norm := p.normalizer()) is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = p.pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, typ in zip(tokens, token_types) if typ == V.TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, typ in zip(tokens, token_types) if typ == V.TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok
