"""Tokenization from a GGUF vocabulary through the `tokenizers` library.

`build_tokenizer` rebuilds the HF tokenizer equivalent to a GGUF vocabulary: byte-level BPE
(`gpt2`, with the pre-tokenizer named by `tokenizer.ggml.pre`) or SentencePiece BPE (`llama`, merges
ranked by piece score, byte fallback). `Tokenizer` adds what llama.cpp does around it: BOS, special
tokens, end-of-generation ids, and detokenization to bytes.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from . import vocab as V
from .errors import SepedgeError

# Texts of control tokens that end a turn in common chat formats (as llama.cpp recognizes them).
EOG_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "</s>", "<|return|>", "<|call|>", "<|end▁of▁sentence|>"}


def _bpe_merges(merges: Sequence[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for m in merges or []:
        left, sep, right = m.partition(" ")
        if not sep:
            raise SepedgeError(f"malformed BPE merge {m!r}")
        pairs.append((left, right))
    return pairs


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece merges adjacent symbols into the piece of highest score; as a BPE merge list that
    is every split (left, right) of every piece, ranked by the piece's score (stable in id order)."""
    ranked = []
    for i, piece in enumerate(tokens):
        splits = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                  for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        for _, _, left, right in sorted(splits):
            ranked.append((-scores[i], i, left, right))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(left, right) for _, _, left, right in ranked]


def build_tokenizer(tokens: Sequence[str], token_types: Sequence[int], model: str, pre: str | None,
                    merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                    add_space_prefix: bool = True) -> HFTokenizer:
    """The HF tokenizer equivalent to a GGUF vocabulary."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if model == "gpt2":
        p = V.PRE_TOKENIZERS.get(pre or "")
        if p is None:
            warnings.warn(f"unknown pre-tokenizer {pre!r}; using GPT-2's, which may split text differently", stacklevel=2)
            p = V.PRE_TOKENIZERS["gpt-2"]
        tok = HFTokenizer(models.BPE(vocab, _bpe_merges(merges), fuse_unk=False, byte_fallback=False,
                                     ignore_merges=p.ignore_merges))
        if (norm := p.normalizer()) is not None:
            tok.normalizer = norm
        tok.pre_tokenizer = p.pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
    elif model == "llama":
        if scores is None:
            raise SepedgeError("a SentencePiece vocabulary needs token scores (tokenizer.ggml.scores)")
        unk = next((t for t, typ in zip(tokens, token_types) if typ == V.TOKEN_UNKNOWN), None)
        tok = HFTokenizer(models.BPE(vocab, _spm_merges(tokens, scores, vocab), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
        steps = [normalizers.Prepend(V.SPM_SPACE)] if add_space_prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", V.SPM_SPACE)])
        tok.decoder = decoders.Sequence([decoders.Replace(V.SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise SepedgeError(f"tokenizer model {model!r} is not supported (supported: gpt2, llama)")
    special = [AddedToken(t, special=True, normalized=False)
               for t, typ in zip(tokens, token_types) if typ == V.TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, typ in zip(tokens, token_types) if typ == V.TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


class Tokenizer:
    """Text <-> token ids for a GGUF model, with llama.cpp's conventions."""

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int], model: str, pre: str | None = None,
                 merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, eot_id: int | None = None,
                 add_bos: bool | None = None, add_space_prefix: bool = True, chat_template: str | None = None):
        self.tokens, self.token_types, self.model = list(tokens), list(token_types), model
        self.hf = build_tokenizer(tokens, token_types, model, pre, merges, scores, add_space_prefix)
        self._lock = threading.Lock()
        self.bos_id, self.eos_id = bos_id, eos_id
        if add_bos is None:  # llama.cpp's defaults when the file does not say
            add_bos = model == "llama" or pre in ("llama-bpe", "llama3", "llama-v3")
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.token_bytes = [V.token_bytes(t, typ, model) for t, typ in zip(tokens, token_types)]
        self.is_control = [typ == V.TOKEN_CONTROL for typ in token_types]
        eog = {i for i in (eos_id, eot_id) if i is not None}
        eog |= {i for i, (t, typ) in enumerate(zip(tokens, token_types)) if typ == V.TOKEN_CONTROL and t in EOG_TEXTS}
        self.eog_ids = frozenset(eog)

    @classmethod
    def from_model(cls, model) -> Tokenizer:
        """From a loaded `sepedge._native.Model`'s metadata."""
        tokens = model.meta("tokenizer.ggml.tokens")
        if not tokens:
            raise SepedgeError(f"{model.path}: the file has no vocabulary (tokenizer.ggml.tokens)")
        types = model.meta("tokenizer.ggml.token_type") or [V.TOKEN_NORMAL] * len(tokens)
        return cls(tokens, types, model.meta("tokenizer.ggml.model", "gpt2"), model.meta("tokenizer.ggml.pre"),
                   model.meta("tokenizer.ggml.merges"), model.meta("tokenizer.ggml.scores"),
                   model.meta("tokenizer.ggml.bos_token_id"), model.meta("tokenizer.ggml.eos_token_id"),
                   model.meta("tokenizer.ggml.eot_token_id"), model.meta("tokenizer.ggml.add_bos_token"),
                   model.meta("tokenizer.ggml.add_space_prefix", True), model.meta("tokenizer.chat_template"))

    @property
    def bos_text(self) -> str:
        return self.tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_text(self) -> str:
        return self.tokens[self.eos_id] if self.eos_id is not None else ""

    def encode(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. special=True parses special-token text such as "<|im_start|>" into
        those tokens; otherwise it is tokenized as plain text."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        with self._lock:  # encode_special_tokens is state of the shared HF tokenizer (server slots share it)
            self.hf.encode_special_tokens = not special
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes:
        """The bytes the tokens stand for; control tokens are left out unless special=True."""
        return b"".join(self.token_bytes[i] for i in ids if special or not self.is_control[i])
