"""Property-based fuzzing (hypothesis) of the Python inputs a hostile user controls: text to
tokenize, chat messages and templates, converter configs and file headers, sampling parameters.
The property is always the same: a result of the right shape, or a SepedgeError with a message;
never a raw Python error, a hang or a crash. $SEPEDGE_FUZZ_EXAMPLES scales the example counts
(the long campaign sets it high; CI keeps the defaults)."""

import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fixtures
from sepedge import ConvertError, Engine, InvalidArgumentError, SepedgeError
from sepedge import chat
from sepedge.convert.arch import find_arch
from sepedge.convert.checkpoint import read_safetensors_header
from sepedge.convert.tokenizer import parse_sentencepiece

SCALE = float(os.environ.get("SEPEDGE_FUZZ_EXAMPLES", "1"))


def examples(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def llm():
    with Engine(fixtures.smollm2_gguf(), n_ctx=256, n_threads=1) as e:
        yield e


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "\n", " ", "system", "user"]
# any code point, surrogates included, and chunks of special-token text
texts = st.lists(st.one_of(st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20),
                           st.sampled_from(SPECIALS)), max_size=8).map("".join)


@examples(300)
@given(text=texts)
def test_tokenize_round_trips_or_refuses(llm, text):
    try:
        ids = llm.tokenize(text, add_bos=False)
    except InvalidArgumentError as e:
        assert "surrogate" in str(e)
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert all(isinstance(i, int) and 0 <= i < llm.n_vocab for i in ids)
    assert llm.detokenize(ids, special=True) == representable(llm, text.encode("utf-8"))


def representable(llm, data: bytes) -> bytes:
    """The bytes a tokenization keeps: those the vocabulary has a token for (SmolLM2 lacks a few
    control bytes; they are left out, as the HF tokenizer does, and documented)."""
    return bytes(b for b in data if b not in llm.tokenizer.missing_bytes)


@examples(100)
@given(data=st.binary(max_size=64))
def test_tokenize_bytes_replaces_invalid_utf8(llm, data):
    ids = llm.tokenize(data, add_bos=False)
    assert llm.detokenize(ids, special=True) == representable(llm, data.decode("utf-8", "replace").encode("utf-8"))


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": texts.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF
                                                                                     for c in t))}),
                    min_size=1, max_size=5)


@examples(150)
@given(msgs=messages)
def test_chat_content_never_forges_special_tokens(llm, msgs):
    start, end = (llm.tokenize(t, add_bos=False, special=True)[0] for t in ("<|im_start|>", "<|im_end|>"))
    ids = llm.format_chat(msgs)
    # the template writes one <|im_start|> per message, one for the generation prompt, and one for
    # the default system prompt when no message is a system one first
    n_turns = len(msgs) + 1 + (msgs[0]["role"] != "system")
    assert ids.count(start) == n_turns and ids.count(end) == n_turns - 1


@examples(150)
@given(msgs=st.one_of(messages, st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                         st.one_of(st.none(), st.integers(), st.text(max_size=5))),
                                         max_size=3), st.none(), st.integers(), st.text(max_size=5)))
def test_rendering_any_messages_gives_text_or_a_clear_error(llm, msgs):
    try:
        out = chat.render(llm.tokenizer.chat_template, msgs)
    except InvalidArgumentError:
        return
    assert isinstance(out, str)


SNIPPETS = ["{% for m in messages %}", "{% endfor %}", "{% for i in range(100000) %}", "{{ m['content'] }}",
            "{{ messages[0]['content'] * 1000 }}", "{% if add_generation_prompt %}", "{% endif %}", "{{ 'x' * 99999 }}",
            "{% set x = 2 ** 64 %}", "{{ raise_exception('no') }}", "{{ m.role.upper() }}", "{{ x }}", "text ",
            "{{ messages | length }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ ''.__class__ }}",
            "{{ range(10**9) | list }}", "{{ cycler }}", "{% include 'x' %}", "{{ 1 / 0 }}", "{{ messages[99] }}",
            "{% for i in range(3) %}{% for j in range(3) %}{{ i * j }}{% endfor %}"]


@examples(200)
@given(parts=st.lists(st.sampled_from(SNIPPETS), max_size=6))
def test_any_template_renders_or_fails_clearly(parts):
    template = "".join(parts)
    try:
        out = chat.render(template, [{"role": "user", "content": "hi"}])
    except SepedgeError:  # compile errors, rejected conversations, too expensive
        return
    assert isinstance(out, str) and len(out) <= chat.MAX_RENDER_CHARS


values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(allow_nan=True),
                   st.text(max_size=4), st.lists(st.integers(), max_size=2))
KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
        "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
        "rope_scaling", "tie_word_embeddings"]
BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5}


@examples(400)
@given(changes=st.dictionaries(st.sampled_from(KEYS), st.one_of(values, st.fixed_dictionaries(
    {"type": st.sampled_from(["linear", "llama3", "yarn", None]), "factor": values})), max_size=4))
def test_converter_hyperparameters_are_valid_or_refused(changes):
    config = {**BASE, **changes}
    try:
        hp = find_arch(config, "config.json").hparams(config, "config.json")
    except ConvertError:
        return
    # what the loader requires of the file (se-model.c)
    assert 1 <= hp.n_embd <= 1 << 20 and 1 <= hp.n_layer <= 4096 and 1 <= hp.n_head <= 4096
    assert 1 <= hp.n_head_kv <= hp.n_head and hp.n_head % hp.n_head_kv == 0
    assert hp.head_dim >= 2 and hp.head_dim % 2 == 0 and 1 <= hp.n_ctx_train < 2 ** 31
    assert 0 < hp.rms_eps < 1 and math.isfinite(hp.rope_theta) and hp.rope_theta > 1


@examples(300)
@given(header=st.one_of(st.binary(max_size=64), st.dictionaries(
    st.text(max_size=5), st.one_of(values, st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", 3]),
                                                                  "shape": st.lists(values, max_size=3),
                                                                  "data_offsets": st.lists(values, max_size=3)})),
    max_size=3).map(lambda d: json.dumps(d).encode())), body=st.binary(max_size=64), forged=st.booleans())
def test_safetensors_headers_are_read_or_refused(tmp_path_factory, header, body, forged):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    n = len(header) if not forged else int.from_bytes(body[:8].ljust(8, b"\0"), "little")
    path.write_bytes(struct.pack("<Q", n) + header + body)
    try:
        tensors = read_safetensors_header(path)
    except ConvertError:
        return
    for t in tensors.values():
        assert t.offset + t.nbytes <= path.stat().st_size


@examples(300)
@given(data=st.binary(max_size=200))
def test_sentencepiece_models_are_parsed_or_refused(data):
    try:
        parse_sentencepiece(data)
    except ValueError:  # its caller turns ValueError (and only that) into a ConvertError naming the file
        pass


@examples(150)
@given(temperature=values, top_k=values, top_p=values, min_p=values, repeat_penalty=values, seed=values,
       max_tokens=values)
def test_sampling_parameters_work_or_are_refused(llm, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                                                 max_tokens):
    try:
        out = llm.generate([1, 2, 3], max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens < 4 else 2,
                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repeat_penalty=repeat_penalty, seed=seed)
    except InvalidArgumentError:
        return
    assert isinstance(out, str)


@examples(150)
@given(tokens=st.one_of(st.lists(values, max_size=4), values, st.binary(max_size=4)))
def test_token_inputs_are_checked(llm, tokens):
    try:
        logits = llm.eval(tokens)
    except InvalidArgumentError:
        return
    assert np.isfinite(logits).all()
    llm.reset()
