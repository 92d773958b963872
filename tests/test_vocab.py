"""Separator rule, pre-tokenizer identification and GGUF -> tokenizers reconstruction, checked on
real vocabularies (llama.cpp's vocab-only GGUFs and their tokenization test vectors)."""

import pytest
from tokenizers import pre_tokenizers

import llama_cpp
from sepedge import vocab as V
from sepedge.tokenizer import build_tokenizer

# SEPLLM.md §2.3: the official Llama-3 id lists (training-free YAML, streaming manager, SepCache)
LLAMA3_TRAINING_FREE = [13, 11, 30, 0, 26, 25, 198, 220, 128000]
LLAMA3_STREAMING = [13, 11, 30, 0, 26, 25, 198, 220, 662, 1174, 949, 758, 2652, 551, 720, 256, 262]
LLAMA3_SEPCACHE = [128000, *LLAMA3_STREAMING]


from fixtures import vocab_fields


@pytest.fixture(scope="module")
def llama3():
    return vocab_fields("llama-bpe")


@pytest.mark.parametrize("text,expected", [
    (".", True), (",", True), ("?", True), ("!", True), (";", True), (":", True),
    (" .", True), (" :", True), (" ", True), ("\n", True), ("\t", True), ("\n\n", True), ("  \n ", True),
    ("\r\n", True), ("", False), ("..", False), (". ", False), ("  .", False), ("a", False), (" the", False),
    ("\u00a0", False), ("。", False), ("-", False), (None, False),
])
def test_separator_rule(text, expected):
    assert V.is_separator_text(text) is expected


def test_llama3_vocab_contains_official_lists(llama3):
    ids = V.derive_separator_ids(llama3["tokenizer.ggml.tokens"], llama3["tokenizer.ggml.token_type"], "gpt2",
                                 llama3["tokenizer.ggml.bos_token_id"])
    for official in (LLAMA3_TRAINING_FREE, LLAMA3_STREAMING, LLAMA3_SEPCACHE):
        assert set(official) <= set(ids), sorted(set(official) - set(ids))
    # and nothing that reads differently: spot-check a few non-separators by id
    tokens = llama3["tokenizer.ggml.tokens"]
    for i in ids:
        if i != 128000:
            assert V.is_separator_text(V.token_text(tokens[i], 1, "gpt2")), (i, tokens[i])
    assert 271 in ids  # "\n\n": whitespace-only, a separator by our rule (not in the official lists)
    assert 128009 not in ids  # <|eot_id|> is a control token, not BOS


def test_token_bytes_sentencepiece():
    assert V.token_bytes("<0x0A>", V.TOKEN_BYTE, "llama") == b"\n"
    assert V.token_bytes("\u2581the", V.TOKEN_NORMAL, "llama") == b" the"
    assert V.token_bytes("<s>", V.TOKEN_CONTROL, "llama") == b"<s>"
    ids = V.derive_separator_ids(["<unk>", "<s>", "<0x0A>", "\u2581.", "\u2581", "."],
                                 [V.TOKEN_UNKNOWN, V.TOKEN_CONTROL, V.TOKEN_BYTE, 1, 1, 1], "llama", bos_id=1)
    assert ids == [1, 2, 3, 4, 5]


def test_token_bytes_byte_level():
    assert V.token_bytes("Ġ.", V.TOKEN_NORMAL, "gpt2") == b" ."
    assert V.token_bytes("ĊĊ", V.TOKEN_NORMAL, "gpt2") == b"\n\n"
    assert V.token_bytes("<|im_end|>", V.TOKEN_CONTROL, "gpt2") == b"<|im_end|>"
    assert sorted(V.GPT2_BYTE_OF.values()) == list(range(256))


def test_resolve_separators(llama3):
    toks, types = llama3["tokenizer.ggml.tokens"], llama3["tokenizer.ggml.token_type"]
    assert V.resolve_separators([".", "\n", 220], toks, types, "gpt2") == [13, 198, 220]
    with pytest.raises(ValueError, match="reads exactly"):
        V.resolve_separators(["no such token text"], toks, types, "gpt2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        V.resolve_separators([10 ** 6], toks, types, "gpt2")
    with pytest.raises(ValueError, match="token id"):
        V.resolve_separators([1.5], toks, types, "gpt2")


def test_parse_separator_option():
    assert V.parse_separator_option('[".", "\\n", 13]') == [".", "\n", 13]
    for bad in ("", ".,", "[]", '{"a": 1}'):
        with pytest.raises(ValueError, match="JSON list"):
            V.parse_separator_option(bad)


@pytest.mark.parametrize("name", list(V.PRE_TOKENIZERS))
def test_identify_each_pre_tokenizer(name):
    p = V.PRE_TOKENIZERS[name]
    assert V.identify_pre_tokenizer(p.normalizer(), p.pre_tokenizer()) == name


@pytest.mark.parametrize("pre", [
    pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    pre_tokenizers.Whitespace(),
])
def test_unknown_pre_tokenizer_is_not_guessed(pre):
    assert V.identify_pre_tokenizer(None, pre) is None


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "gpt-2"])
def test_rebuilt_tokenizer_matches_llama_cpp_vectors(name):
    f = vocab_fields(name)
    tok = build_tokenizer(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.model"],
                          f["tokenizer.ggml.pre"], f["tokenizer.ggml.merges"])
    path = llama_cpp.vocab_file(name)
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = path.with_suffix(".gguf.out").read_text().split("\n")
    assert len(texts) >= 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(x) for x in ids.split()], repr(text)
