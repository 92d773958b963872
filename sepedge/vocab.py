"""Vocabulary facts shared by the converter and the runtime.

A GGUF vocabulary is a list of token strings plus a token type per id. How a string maps to bytes
depends on the tokenizer model: byte-level BPE (`gpt2`) spells bytes with the GPT-2 printable
alphabet, SentencePiece (`llama`) spells spaces as U+2581 and stores raw bytes as `<0xNN>` tokens.
The separator rule of SepLLM is stated on the decoded text, so everything goes through
`token_bytes` first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Regex, normalizers, pre_tokenizers

# GGUF `tokenizer.ggml.token_type` values (same numbering as SentencePiece's piece types)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"
_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# SepLLM's nine separators (SEPLLM.md §2.1); the three whitespace ones are covered, with every run of
# whitespace, by the whitespace rule below.
SEPARATOR_PUNCT = (".", ",", "?", "!", ";", ":")
_ASCII_SPACE = frozenset(" \t\n\r\v\f")


def _gpt2_byte_table() -> dict[str, int]:
    # GPT-2 maps every byte to a printable code point: printable Latin-1 bytes map to themselves,
    # the other 68 bytes to U+0100 onwards, in byte order.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


GPT2_BYTE_OF = _gpt2_byte_table()
GPT2_CHAR_OF = {b: c for c, b in GPT2_BYTE_OF.items()}


def token_bytes(token: str, token_type: int, model: str) -> bytes:
    """The bytes a token stands for when it is detokenized."""
    if token_type in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_UNKNOWN):
        return token.encode("utf-8")  # added tokens are stored as plain text in both models
    if model == "gpt2":
        if all(c in GPT2_BYTE_OF for c in token):
            return bytes(GPT2_BYTE_OF[c] for c in token)
        return token.encode("utf-8")
    if model == "llama":
        if token_type == TOKEN_BYTE and (m := _SPM_BYTE.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        return token.replace(SPM_SPACE, " ").encode("utf-8")
    raise ValueError(f"unsupported tokenizer model {model!r} (supported: gpt2, llama)")


def token_text(token: str, token_type: int, model: str) -> str | None:
    """Decoded text of a token, or None when its bytes are not valid UTF-8 on their own."""
    try:
        return token_bytes(token, token_type, model).decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_separator_text(text: str | None) -> bool:
    """SepLLM's rule on decoded text: a separator, a space-prefixed one, or whitespace only."""
    if not text:
        return False
    if text in SEPARATOR_PUNCT or (text[0] == " " and text[1:] in SEPARATOR_PUNCT):
        return True
    return all(c in _ASCII_SPACE for c in text)


def derive_separator_ids(tokens: Sequence[str], token_types: Sequence[int], model: str,
                         bos_id: int | None = None) -> list[int]:
    """Separator token ids of a vocabulary (SEPLLM.md §2, §10.4).

    Control, unused and unknown tokens never count, except BOS: the official Llama-3
    training-free list keeps `<|begin_of_text|>` as a separator.
    """
    ids = []
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
        if typ in (TOKEN_NORMAL, TOKEN_BYTE, TOKEN_USER_DEFINED) and is_separator_text(token_text(tok, typ, model)):
            ids.append(i)
    if bos_id is not None and 0 <= bos_id < len(tokens) and bos_id not in ids:
        ids.append(bos_id)
    return sorted(ids)


def resolve_separators(spec: Iterable[str | int], tokens: Sequence[str], token_types: Sequence[int],
                       model: str) -> list[int]:
    """Separator ids from a user override: ints are token ids, strings are matched against the
    decoded text of every token (so "." picks every token that reads exactly ".")."""
    wanted_text, ids = set(), set()
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"separator {item!r} must be a token id (int) or a token text (str)")
        if isinstance(item, int):
            if not 0 <= item < len(tokens):
                raise ValueError(f"separator id {item} is outside the vocabulary (0..{len(tokens) - 1})")
            ids.add(item)
        elif item == "":
            raise ValueError("separator text must not be empty")
        else:
            wanted_text.add(item)
    found = set()
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
        text = token_text(tok, typ, model)
        if text in wanted_text:
            ids.add(i)
            found.add(text)
    if missing := wanted_text - found:
        raise ValueError(f"no token in the vocabulary reads exactly {sorted(missing)!r}")
    return sorted(ids)


def parse_separator_option(value: str) -> list[str | int]:
    """`--separators` takes a JSON list of token texts and ids, e.g. '[".", ",", "\\n", 198]'."""
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--separators must be a JSON list such as '[\".\", \",\", \"\\\\n\", 198]': {e}") from None
    if not isinstance(spec, list) or not spec:
        raise ValueError("--separators must be a non-empty JSON list of token texts and ids")
    return spec


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers of byte-level BPE vocabularies, by their llama.cpp `tokenizer.ggml.pre` name.
# The converter identifies a tokenizer.json by comparing its behaviour with these definitions;
# the runtime rebuilds a `tokenizers` tokenizer from them.

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    name: str            # llama.cpp's `tokenizer.ggml.pre`
    split: str | None    # regex applied before byte-level mapping; None = GPT-2's built-in regex
    digits: bool = False  # split every digit on its own first (SmolLM)
    nfc: bool = False    # NFC-normalize the text first (Qwen2)
    ignore_merges: bool = False  # a word that is already a token is not merged (Llama 3)

    def normalizer(self):
        return normalizers.NFC() if self.nfc else None

    def pre_tokenizer(self):
        steps = []
        if self.digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        if self.split is not None:
            steps.append(pre_tokenizers.Split(Regex(self.split), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.split is None))
        return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {p.name: p for p in (
    PreTokenizer("gpt-2", split=None),
    PreTokenizer("smollm", split=None, digits=True),
    PreTokenizer("llama-bpe", split=LLAMA3_SPLIT, ignore_merges=True),
    PreTokenizer("qwen2", split=QWEN2_SPLIT, nfc=True),
)}

# Texts on which the known pre-tokenizers disagree with each other: digit runs, case-insensitive
# contractions, letters after punctuation, whitespace runs before newlines, composed accents.
PRE_TOKENIZER_PROBES = (
    "Hello world", " Hello World!", "Hello, world!  How's it going? I'M FINE, THEY'LL see.",
    "1 12 123 1234 12345 1234567 3.14159 1,000,000 ½ ²",
    "\n \n\n \t\t\n\r\n   \n    x    \n", "a\u0301 e\u0301te\u0301 Åmål", "il était; l'été: 'tis",
    "def f(x):\n    return x**2  # square\n\n\tpass", "$@#%^&*()[]{}<>~`|\\/--- ...!!!???",
    "ещё нещо на български 中文字符测试 日本語のテキスト 한국어 텍스트 🦙🚀👍🏽 ",
    "w048 7tuijk dsdfhu", "'s 'S 'T 'Re 'vE 'M 'LL 'd x'sy", "   leading and trailing   ",
)


def pre_tokenize(normalizer, pre_tokenizer, text: str) -> list[str]:
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    if pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def identify_pre_tokenizer(normalizer, pre_tokenizer) -> str | None:
    """The llama.cpp `pre` name whose behaviour equals the given normalizer + pre-tokenizer on
    every probe text, or None."""
    actual = [pre_tokenize(normalizer, pre_tokenizer, t) for t in PRE_TOKENIZER_PROBES]
    for p in PRE_TOKENIZERS.values():
        if actual == [pre_tokenize(p.normalizer(), p.pre_tokenizer(), t) for t in PRE_TOKENIZER_PROBES]:
            return p.name
    return None
