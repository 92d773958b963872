"""Tokenization from a GGUF vocabulary through the `tokenizers` library.

`build_tokenizer` rebuilds the HF tokenizer equivalent to a GGUF vocabulary: byte-level BPE
(`gpt2`, with the pre-tokenizer named by `tokenizer.ggml.pre`) or SentencePiece BPE (`llama`, merges
ranked by piece score, byte fallback). `Tokenizer` adds what llama.cpp does around it: BOS, special
tokens, end-of-generation ids, and detokenization to bytes.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from . import vocab as V
from .errors import InvalidArgumentError, ModelLoadError, SepedgeError

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
        """From a loaded `sepedge._native.Model`'s metadata, every field checked first (ModelLoadError
        naming the key): types, array lengths, ids inside the vocabulary."""
        f = read_tokenizer_fields(model.meta, model.path, model.n_vocab)
        try:
            return cls(f["tokens"], f["token_type"], f["model"], f["pre"], f["merges"], f["scores"], f["bos_token_id"],
                       f["eos_token_id"], f["eot_token_id"], f["add_bos_token"], f["add_space_prefix"], f["chat_template"])
        except SepedgeError as e:
            raise ModelLoadError(f"{model.path}: {e}") from None
        except Exception as e:  # the tokenizers library refusing the vocabulary (e.g. a malformed merge)
            raise ModelLoadError(f"{model.path}: the vocabulary cannot be built: {type(e).__name__}: {e}") from None

    @property
    def bos_text(self) -> str:
        return self.tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_text(self) -> str:
        return self.tokens[self.eos_id] if self.eos_id is not None else ""

    _lock = threading.Lock()  # encode_special_tokens is a setting of the shared HF object

    @property
    def missing_bytes(self) -> frozenset[int]:
        """Bytes no token stands for (byte-level BPE vocabularies that never saw some control
        bytes, e.g. SmolLM2's 0x16). encode() leaves them out, as the HF tokenizer does."""
        if not hasattr(self, "_missing"):
            if self.model == "gpt2":
                have = set(self.tokens)
                self._missing = frozenset(b for b in range(256) if V.GPT2_CHAR_OF[b] not in have)
            else:  # SentencePiece: byte fallback tokens <0xNN>
                have = {bytes_ for bytes_, typ in zip(self.token_bytes, self.token_types) if typ == V.TOKEN_BYTE}
                self._missing = frozenset(b for b in range(256) if bytes([b]) not in have) if have else frozenset()
        return self._missing

    def encode(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. special=True parses special-token text such as "<|im_start|>" into
        those tokens; otherwise it is tokenized as plain text. Bytes that are not UTF-8 become U+FFFD
        (documented replacement); a str with lone surrogates is refused (InvalidArgumentError);
        bytes the vocabulary has no token for (missing_bytes) are left out."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be str or bytes, got {type(text).__name__}")
        check_text(text)
        with self._lock:
            self.hf.encode_special_tokens = not special
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    @property
    def _control_pattern(self) -> re.Pattern | None:
        """Control-token texts, longest first: a leftmost-longest match, as the HF added-token split."""
        if not hasattr(self, "_control_re"):
            self._control_ids = {}
            for i, (t, c) in enumerate(zip(self.tokens, self.is_control)):
                if c and t:
                    self._control_ids.setdefault(t, i)
            texts = sorted(self._control_ids, key=len, reverse=True)
            self._control_re = re.compile("|".join(map(re.escape, texts))) if texts else None
        return self._control_re

    def contains_special(self, text: str) -> bool:
        return self._control_pattern is not None and self._control_pattern.search(text) is not None

    def encode_spans(self, text: str, spans: list[tuple[int, int]], start: int = 0,
                     add_bos: bool | None = None) -> list[int]:
        """Token ids of text[start:] where special-token text is parsed outside `spans` (the
        template's own "<|im_start|>") and not inside them (what a user typed). Text between the
        template's special tokens is tokenized as one piece, so a conversation whose contents hold
        no special-token text tokenizes exactly as encode(text, special=True)."""
        cuts = []  # (start, end, id) of the template's special tokens
        if (pattern := self._control_pattern) is not None:
            for m in pattern.finditer(text, start):
                if not any(a < m.end() and m.start() < b for a, b in spans):
                    cuts.append((m.start(), m.end(), self._control_ids[m.group()]))
        ids, pos = [], start
        for a, b, tid in cuts:
            if a > pos:
                ids += self.encode(text[pos:a], add_bos=False, special=False)
            ids.append(tid)
            pos = b
        if pos < len(text):
            ids += self.encode(text[pos:], add_bos=False, special=False)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes:
        """The bytes the tokens stand for; control tokens are left out unless special=True."""
        return b"".join(self.token_bytes[i] for i in ids if special or not self.is_control[i])


def check_text(text: str) -> None:
    """Refuse lone surrogates (a str that is not Unicode text: it has no UTF-8 encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"the text has a lone surrogate {text[e.start]!r} at index {e.start}: not valid "
                                   "Unicode (decode bytes with errors='replace' or 'surrogateescape' first)") from None


def _fail(path, key: str, what: str):
    raise ModelLoadError(f"{path}: '{key}' {what}")


def read_tokenizer_fields(meta, path, n_vocab: int) -> dict:
    """The tokenizer.* keys through `meta(key, default)`, checked: types, lengths equal to the
    vocabulary, token ids inside it. Any defect is a ModelLoadError naming the key, at load time."""
    p = "tokenizer.ggml."
    f = {}

    def strings(key, required=False):
        v = meta(key)
        if v is None:
            if required:
                _fail(path, key, "is missing: the file has no vocabulary")
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            _fail(path, key, "is not an array of strings")
        return v

    def string(key, default=None):
        v = meta(key, default)
        if v is not None and not isinstance(v, str):
            _fail(path, key, f"is not a string (got {type(v).__name__})")
        return v

    def flag(key, default):
        v = meta(key, default)
        if v is not None and not isinstance(v, bool):
            _fail(path, key, f"is not a bool (got {v!r})")
        return v

    f["tokens"] = tokens = strings(p + "tokens", required=True)
    if not tokens:
        _fail(path, p + "tokens", "is empty")
    if len(tokens) != n_vocab:
        _fail(path, p + "tokens", f"has {len(tokens)} tokens, but the model has {n_vocab} embedding rows")
    types = meta(p + "token_type")
    if types is None:
        types = [V.TOKEN_NORMAL] * len(tokens)
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        _fail(path, p + "token_type", "is not an array of integers")
    if len(types) != len(tokens):
        _fail(path, p + "token_type", f"has {len(types)} entries for {len(tokens)} tokens")
    if bad := [t for t in types if not V.TOKEN_NORMAL <= t <= V.TOKEN_BYTE]:
        _fail(path, p + "token_type", f"holds {bad[0]}, not a token type (1..6)")
    f["token_type"] = types
    f["model"] = string(p + "model", "gpt2")
    f["pre"] = string(p + "pre")
    f["merges"] = strings(p + "merges")
    if f["merges"] is not None and (bad := [m for m in f["merges"] if " " not in m]):
        _fail(path, p + "merges", f"holds {bad[0]!r}, not a pair 'left right'")
    scores = meta(p + "scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
            _fail(path, p + "scores", "is not an array of numbers")
        if len(scores) != len(tokens):
            _fail(path, p + "scores", f"has {len(scores)} entries for {len(tokens)} tokens")
        if any(x != x for x in scores):
            _fail(path, p + "scores", "holds NaN")
    f["scores"] = scores
    for name in ("bos", "eos", "eot", "eom", "unknown", "padding", "seperator", "mask"):
        key = f"{p}{name}_token_id"
        v = meta(key)
        if v is not None and (isinstance(v, (bool, list)) or not isinstance(v, int) or not 0 <= v < len(tokens)):
            _fail(path, key, f"= {v!r} is not a token id in [0, {len(tokens) - 1}]")
        f[f"{name}_token_id"] = v
    f["add_bos_token"] = flag(p + "add_bos_token", None)
    f["add_space_prefix"] = flag(p + "add_space_prefix", True)
    f["chat_template"] = string("tokenizer.chat_template")
    return f
