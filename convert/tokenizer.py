"""HF tokenizer files -> the GGUF vocabulary (`tokenizer.ggml.*`).

Two kinds are supported, as llama.cpp names them: `gpt2` (byte-level BPE from tokenizer.json:
Llama 3, SmolLM, Qwen2, GPT-2) and `llama` (SentencePiece BPE from tokenizer.model: Llama 1/2).
Merges, special token ids, add_bos/add_eos and the chat template come from gguf's SpecialVocab,
which reads tokenizer.json, tokenizer_config.json and config.json the way llama.cpp does.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from .. import vocab as V
from ..errors import ConvertError


@dataclass
class GGUFVocab:
    model: str                      # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    special: gguf.SpecialVocab | None = None
    spm_flags: dict[str, bool] = field(default_factory=dict)  # add_space_prefix, remove_extra_whitespaces

    @property
    def bos_id(self) -> int | None:
        return self.special.special_token_ids.get("bos") if self.special else None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.spm_flags:
            w.add_add_space_prefix(self.spm_flags["add_space_prefix"])
            w.add_remove_extra_whitespaces(self.spm_flags["remove_extra_whitespaces"])
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


def load_vocab(model_dir: Path, n_vocab: int) -> GGUFVocab:
    if (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(model_dir, n_vocab)
    elif (model_dir / "tokenizer.json").is_file():
        vocab = _bpe_vocab(model_dir, n_vocab)
    else:
        raise ConvertError(f"{model_dir}: no tokenizer.json or tokenizer.model")
    # SpecialVocab reports problems through logging; keep the converter's output clean
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        vocab.special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConvertError(f"{model_dir}: unreadable tokenizer_config.json or config.json: {e}") from None
    if vocab.model == "gpt2" and not vocab.special.merges:
        raise ConvertError(f"{model_dir / 'tokenizer.json'}: the BPE model has no merges")
    return vocab


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable tokenizer: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: unreadable tokenizer: not a JSON object")
    return data


def _pad_vocab(tokens: list, types: list, n_vocab: int, where: Path, scores: list | None = None) -> None:
    # config.json's vocab_size may exceed the tokenizer (embedding rows padded for speed); llama.cpp
    # fills the holes with unused [PAD{i}] tokens
    if len(tokens) > n_vocab:
        raise ConvertError(f"{where}: the tokenizer has {len(tokens)} tokens but config.json vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(V.TOKEN_UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _bpe_vocab(model_dir: Path, n_vocab: int) -> GGUFVocab:
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ConvertError(f"{path}: unsupported tokenizer (need a byte-level BPE tokenizer.json, or tokenizer.model "
                           f"for SentencePiece); model type {model.get('type')!r}, decoder {decoder.get('type')!r}")
    by_id: dict[int, tuple[str, int]] = {}
    try:
        for text, i in (model.get("vocab") or {}).items():
            by_id[int(i)] = (str(text), V.TOKEN_NORMAL)
        for t in tj.get("added_tokens") or []:
            by_id[int(t["id"])] = (str(t["content"]), V.TOKEN_CONTROL if t.get("special") else V.TOKEN_USER_DEFINED)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConvertError(f"{path}: unreadable tokenizer: malformed vocabulary ({e!r})") from None
    if not by_id:
        raise ConvertError(f"{path}: the tokenizer has an empty vocabulary")
    if sorted(by_id) != list(range(len(by_id))):
        raise ConvertError(f"{path}: token ids are not contiguous from 0 (largest id {max(by_id)}, {len(by_id)} tokens)")
    tokens = [by_id[i][0] for i in range(len(by_id))]
    types = [by_id[i][1] for i in range(len(by_id))]
    _pad_vocab(tokens, types, n_vocab, path)
    try:
        hf = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise ConvertError(f"{path}: unreadable tokenizer: {e}") from None
    pre = V.identify_pre_tokenizer(hf.normalizer, hf.pre_tokenizer)
    if pre is None:
        raise ConvertError(f"{path}: unrecognized pre-tokenizer (supported: {', '.join(V.PRE_TOKENIZERS)}); "
                           f"the GGUF would tokenize differently from the original")
    return GGUFVocab("gpt2", pre, tokens, types)


# ---------------------------------------------------------------------------------------------
# SentencePiece: tokenizer.model is a protobuf ModelProto. Only a few fields matter, so a small
# wire-format reader replaces the sentencepiece/protobuf dependency.

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield num, wire, value


SPM_BPE = 2  # TrainerSpec.ModelType


def parse_sentencepiece(data: bytes) -> tuple[list[tuple[str, float, int]], dict[str, bool], int]:
    """(pieces as (text, score, type), normalizer flags, model type) of a ModelProto."""
    pieces, flags, model_type = [], {"add_space_prefix": True, "remove_extra_whitespaces": True}, 1
    for num, wire, value in _fields(data):
        if num == 1 and wire == 2:      # SentencePiece piece
            text, score, typ = "", 0.0, V.TOKEN_NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    text = v.decode("utf-8")
                elif n == 2 and w == 5:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and w == 0:
                    typ = v
            pieces.append((text, score, typ))
        elif num == 2 and wire == 2:    # TrainerSpec
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    model_type = v
        elif num == 3 and wire == 2:    # NormalizerSpec
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    flags["add_space_prefix"] = bool(v)
                elif n == 4 and w == 0:
                    flags["remove_extra_whitespaces"] = bool(v)
    return pieces, flags, model_type


def _sentencepiece_vocab(model_dir: Path, n_vocab: int) -> GGUFVocab:
    path = model_dir / "tokenizer.model"
    try:
        pieces, flags, model_type = parse_sentencepiece(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: unreadable SentencePiece model: {e}") from None
    if not pieces:
        raise ConvertError(f"{path}: unreadable SentencePiece model: no pieces")
    if model_type != SPM_BPE:
        raise ConvertError(f"{path}: SentencePiece model type {model_type} is not supported (only BPE, type {SPM_BPE})")
    tokens = [p[0] for p in pieces]
    scores = [p[1] for p in pieces]
    types = [p[2] if 1 <= p[2] <= 6 else V.TOKEN_NORMAL for p in pieces]
    # tokens added on top of the SentencePiece model (chat markers and the like)
    tj_path = model_dir / "tokenizer.json"
    added = (_read_json(tj_path).get("added_tokens") or []) if tj_path.is_file() else []
    try:
        added = sorted(((int(t["id"]), str(t["content"]), bool(t.get("special"))) for t in added))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConvertError(f"{tj_path}: unreadable tokenizer: malformed added_tokens ({e!r})") from None
    for i, content, special in added:
        typ = V.TOKEN_CONTROL if special else V.TOKEN_USER_DEFINED
        if i < len(tokens):
            if tokens[i] != content:
                raise ConvertError(f"{tj_path}: added token {content!r} has id {i}, "
                                   f"which tokenizer.model assigns to {tokens[i]!r}")
            if types[i] in (V.TOKEN_NORMAL, V.TOKEN_UNUSED):  # keep SentencePiece's unk/control/byte
                types[i] = typ
        elif i == len(tokens):
            tokens.append(content)
            scores.append(-1000.0)
            types.append(typ)
        else:
            raise ConvertError(f"{tj_path}: added token ids are not contiguous after the SentencePiece vocabulary")
    _pad_vocab(tokens, types, n_vocab, path, scores)
    return GGUFVocab("llama", "default", tokens, types, scores=scores, spm_flags=flags)
