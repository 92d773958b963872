"""HF -> GGUF conversion: tensors, metadata, vocabulary, separators, sources and every error path."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

import fixtures
from fixtures import SPECS, gguf_fields, hf_name, hf_state, unpermute_rows
from sepedge import ConvertError
from sepedge import vocab as V
from sepedge.cli import main as cli
from sepedge.convert import OUTTYPES, convert
from sepedge.reference import ModelArgs, _llama3_factors
from test_quants import MAX_REL_RMS_ERROR

@pytest.fixture(scope="module")
def converted(tiny_dirs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gguf")
    done = {}

    def get(spec_name: str, outtype: str) -> Path:
        if (spec_name, outtype) not in done:
            done[spec_name, outtype] = convert(tiny_dirs(spec_name), out_dir / f"{spec_name}-{outtype}.gguf",
                                               outtype=outtype, progress=False)
        return done[spec_name, outtype]

    return get


def expected_type(name: str, shape, outtype: str, spec) -> QT:
    """llama.cpp's choices (convert_hf_to_gguf.py; llama-quantize for the 4-bit mixes), restated."""
    if len(shape) == 1:
        return QT.F32
    t = OUTTYPES[outtype]
    if t in (QT.Q4_0, QT.Q4_1, QT.Q4_K) and (name == "output.weight" or (spec.tied and name == "token_embd.weight")):
        t = QT.Q6_K
    elif outtype == "q4_k_m" and name.endswith(("attn_v.weight", "ffn_down.weight")):
        i, n = int(name.split(".")[1]), spec.n_layer
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:
            t = QT.Q6_K
    fallback = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0, QT.Q5_0: QT.F16, QT.Q8_0: QT.F16, QT.Q4_0: QT.F16, QT.Q4_1: QT.F16}
    while shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
        t = fallback[t]
    return t


def reference_bytes(x: np.ndarray, qtype: QT) -> np.ndarray:
    """The GGUF bytes llama.cpp's own tooling would write for these float32 rows."""
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if qtype == QT.BF16:
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(len(x), -1)
    return np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(len(x), -1)


@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_round_trip(converted, tiny_dirs, spec, outtype):
    path = converted(spec.name, outtype)
    src = hf_state(tiny_dirs(spec.name))
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    assert ("output.weight" in names) is not spec.tied
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        x = src[hf_name(t.name)]
        shape = tuple(reversed(t.shape.tolist()))
        assert shape == x.shape, t.name
        qtype = expected_type(t.name, shape, outtype, spec)
        assert t.tensor_type == qtype, t.name
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")) and spec.arch == "llama":
            heads = spec.n_head if "attn_q" in t.name else spec.n_head_kv
            back = unpermute_rows(back, heads)
            permuted = x.reshape(heads, 2, spec.dim // 2, -1).swapaxes(1, 2).reshape(x.shape)
        else:
            permuted = x
        # bit-identical to the reference quantizers (gguf has none for K-quants), within the type's error
        if qtype not in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(len(permuted) if permuted.ndim == 2 else 1, -1),
                                  reference_bytes(permuted, qtype)), t.name
        if qtype == QT.F32:
            assert np.array_equal(back, x), t.name
        else:
            rel = np.sqrt(np.mean((back - x) ** 2) / max(np.mean(x ** 2), 1e-30))
            assert rel <= MAX_REL_RMS_ERROR[qtype] * (1.5 if t.name.endswith("norm.weight") else 1), t.name


def test_metadata_keys_and_types(converted):
    r = gguf.GGUFReader(converted("mha-d64", "q8_0"))
    types = {k: f.types for k, f in r.fields.items()}
    value = {k: f.contents() for k, f in r.fields.items()}
    u32 = [VT.UINT32]
    for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "llama.vocab_size", "general.file_type", "general.quantization_version",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "sepllm.n_init", "sepllm.n_sep", "sepllm.n_local", "sepllm.n_cache"):
        assert types[key] == u32, key
    for key in ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"):
        assert types[key] == [VT.FLOAT32], key
    assert types["tokenizer.ggml.token_type"] == [VT.ARRAY, VT.INT32]
    assert types["tokenizer.ggml.tokens"] == [VT.ARRAY, VT.STRING]
    assert types["tokenizer.ggml.merges"] == [VT.ARRAY, VT.STRING]
    assert types["sepllm.separator_token_ids"] == [VT.ARRAY, VT.UINT32]
    assert value["general.architecture"] == "llama"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["general.quantization_version"] == 2
    assert value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.pre"] == "llama-bpe"
    assert value["tokenizer.chat_template"] == fixtures.CHAT_TEMPLATE
    assert (value["llama.embedding_length"], value["llama.attention.head_count"]) == (128, 2)
    assert value["llama.rope.dimension_count"] == 64
    assert value["llama.attention.key_length"] == value["llama.attention.value_length"] == 64
    assert [value[f"sepllm.{k}"] for k in ("n_init", "n_sep", "n_local", "n_cache")] == [4, 64, 256, 800]


@pytest.mark.parametrize("outtype,file_type", [
    ("f32", gguf.LlamaFileType.ALL_F32), ("f16", gguf.LlamaFileType.MOSTLY_F16),
    ("bf16", gguf.LlamaFileType.MOSTLY_BF16), ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0),
    ("q4_1", gguf.LlamaFileType.MOSTLY_Q4_1)])
def test_file_type(converted, outtype, file_type):
    assert gguf_fields(converted("gqa3-sharded-padded", outtype))["general.file_type"] == file_type


def test_vocabulary_matches_tokenizer(converted, tiny_dirs):
    for spec in SPECS:
        f = gguf_fields(converted(spec.name, "f16"))
        tokens, types, merges = fixtures.truncated_vocab(spec.n_tokens or spec.n_vocab)
        n_pad = spec.n_vocab - len(tokens)
        assert f["tokenizer.ggml.tokens"] == tokens + [f"[PAD{i}]" for i in range(len(tokens), spec.n_vocab)]
        assert f["tokenizer.ggml.token_type"] == types + [V.TOKEN_UNUSED] * n_pad
        assert f["tokenizer.ggml.merges"] == merges
        assert f["tokenizer.ggml.pre"] == spec.pre
        assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert f[f"{spec.arch}.vocab_size"] == spec.n_vocab


def test_rope_scaling(converted):
    spec = fixtures.SPEC_BY_NAME["gqa-d128-llama31"]
    r = gguf.GGUFReader(converted(spec.name, "q4_0"))
    (freqs,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == QT.F32 and freqs.shape.tolist() == [spec.dim // 2]
    args = ModelArgs(0, spec.n_embd, 0, spec.n_head, spec.n_head_kv, 0, spec.dim, 0.0, spec.rope_theta)
    np.testing.assert_allclose(np.asarray(freqs.data), _llama3_factors(args, spec.rope_scaling), rtol=1e-6)
    assert "llama.rope.scaling.type" not in r.fields  # Llama 3.1 scaling lives in rope_freqs only

    f = gguf_fields(converted("odd-rows-linear-rope", "f16"))
    assert (f["llama.rope.scaling.type"], f["llama.rope.scaling.factor"]) == ("linear", 2.0)
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(converted("odd-rows-linear-rope", "f16")).tensors}


def test_explicit_head_dim(converted):
    f = gguf_fields(converted("explicit-head-dim", "f32"))
    assert f["llama.attention.key_length"] == f["llama.attention.value_length"] == f["llama.rope.dimension_count"] == 64


def test_separators_in_file(converted):
    path = converted("mha-d64", "f32")
    f = gguf_fields(path)
    expected = V.derive_separator_ids(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], "gpt2", 1)
    assert f["sepllm.separator_token_ids"] == expected
    texts = fixtures.separator_texts(path)
    assert {".", ",", "?", "!", ";", ":", " ", "\n", "\t", "  ", "<|im_start|>"} <= texts
    assert all(V.is_separator_text(t) for t in texts - {"<|im_start|>"})


def test_separator_override_and_sizes(tiny_dirs, tmp_path):
    out = convert(tiny_dirs("mha-d64"), tmp_path / "o.gguf", outtype="f32", separators=[".", "\n", 7],
                  n_init=3, n_sep=32, n_local=224, n_cache=324, progress=False)
    f = gguf_fields(out)
    toks = f["tokenizer.ggml.tokens"]
    ids = f["sepllm.separator_token_ids"]
    assert 7 in ids and {V.token_text(toks[i], 1, "gpt2") for i in ids if i != 7} == {".", "\n"}
    assert [f[f"sepllm.{k}"] for k in ("n_init", "n_sep", "n_local", "n_cache")] == [3, 32, 224, 324]
    with pytest.raises(ConvertError, match="reads exactly"):
        convert(tiny_dirs("mha-d64"), tmp_path / "x.gguf", separators=["§§§"], progress=False)
    with pytest.raises(ConvertError, match="n_cache"):
        convert(tiny_dirs("mha-d64"), tmp_path / "x.gguf", n_init=4, n_sep=64, n_local=256, n_cache=300, progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_auto_outtype_and_default_name(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = convert(tiny_dirs("gqa-d128-llama31"), outtype="auto", progress=False)  # bf16 source
    assert out.name.endswith("-BF16.gguf") and out.parent == tmp_path
    assert gguf_fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    out = convert(tiny_dirs("gqa3-sharded-padded"), outtype="auto", progress=False)  # f16 source
    assert gguf_fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_gguf_source_gets_fresh_metadata(converted, tmp_path):
    src = converted("mha-d64", "q4_1")
    out = convert(src, tmp_path / "re.gguf", separators=["."], n_cache=1000, progress=False)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
    fa, fb = gguf_fields(src), gguf_fields(out)
    assert {k: v for k, v in fa.items() if not k.startswith("sepllm.")} == \
           {k: v for k, v in fb.items() if not k.startswith("sepllm.")}
    assert fb["sepllm.n_cache"] == 1000 and len(fb["sepllm.separator_token_ids"]) < len(fa["sepllm.separator_token_ids"])
    with pytest.raises(ConvertError, match="requantizing"):
        convert(src, tmp_path / "q.gguf", outtype="q8_0", progress=False)
    with pytest.raises(ConvertError, match="overwrite"):
        convert(out, out, progress=False)


def test_cli_convert_and_info(tiny_dirs, tmp_path):
    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(cli, ["convert", str(tiny_dirs("mha-d64")), "-o", str(out), "--outtype", "q4_0", "-q",
                                   "--separators", '[".", ","]'])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    res = CliRunner().invoke(cli, ["info", str(out)])
    assert res.exit_code == 0, res.output
    for text in ("llama", "MOSTLY_Q4_0", "Q4_0 x", "F32 x", "Q8_0 x1", "gpt2 / llama-bpe", "n_cache 800", "'.'", "','"):
        assert text in res.output, text
    res = CliRunner().invoke(cli, ["info", str(out), "--json"])
    s = json.loads(res.output)
    assert s["n_layer"] == 2 and s["separators_source"] == "file" and {t["text"] for t in s["separators"]} == {".", ","}
    res = CliRunner().invoke(cli, ["convert", str(tiny_dirs("mha-d64")), "-o", str(tmp_path / "y.gguf"),
                                   "--separators", "., "])
    assert res.exit_code != 0 and "JSON list" in res.output


# ---------------------------------------------------------------------------------------------
# Sources: sharded checkpoints, the Hugging Face cache, offline


def fake_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> None:
    """The on-disk layout huggingface_hub uses for a downloaded snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("offline", ["1", None])
def test_hub_id_from_local_cache(tiny_dirs, tmp_path, offline):
    fake_hub_cache(tmp_path / "hf", "acme/tiny-llama", tiny_dirs("gqa3-sharded-padded"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the Hub is unreachable
    out = tmp_path / "hub.gguf"
    done = subprocess.run([sys.executable, "-m", "sepedge.cli", "convert", "acme/tiny-llama", "-o", str(out), "-q",
                           "--outtype", "q8_0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert gguf_fields(out)["general.name"] == "tiny-llama"
    done = subprocess.run([sys.executable, "-m", "sepedge.cli", "convert", "acme/not-cached", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "local cache" in done.stderr


# ---------------------------------------------------------------------------------------------
# Errors: each names the file and the problem, and leaves no output behind


@pytest.fixture
def broken(tiny_dirs, tmp_path):
    """A fresh copy of a tiny checkpoint to damage."""
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs("mha-d64"), d)
    return d


def edit_config(d: Path, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


def rewrite_weights(d: Path, edit):
    from safetensors.torch import load_file, save_file
    w = load_file(str(d / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"))


def expect_error(src, out_dir: Path, match: str, where: str | None = None):
    out = out_dir / "out.gguf"
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, out, progress=False)
    if where:
        assert where in str(e.value)
    assert not out.exists() and not list(out_dir.glob(".*partial"))
    return e.value


def test_error_unknown_architecture(broken, tmp_path):
    edit_config(broken, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    expect_error(broken, tmp_path, "unsupported architecture GPTNeoXForCausalLM", "config.json")


def test_error_missing_tensor(broken, tmp_path):
    rewrite_weights(broken, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(broken, tmp_path, r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight", str(broken))


def test_error_extra_tensor(broken, tmp_path):
    rewrite_weights(broken, lambda w: w.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3, 3)}))
    expect_error(broken, tmp_path, r"unexpected tensors model\.layers\.2", "model.safetensors")


def test_error_shape_mismatch(broken, tmp_path):
    rewrite_weights(broken, lambda w: w.update({"model.norm.weight": torch.ones(127)}))
    expect_error(broken, tmp_path, r"'model\.norm\.weight' has shape \[127\], config\.json implies \[128\]",
                 "model.safetensors")


def test_error_unsupported_dtype(broken, tmp_path):
    rewrite_weights(broken, lambda w: w.update({"model.norm.weight": torch.ones(128, dtype=torch.float64)}))
    expect_error(broken, tmp_path, "dtype F64", "model.safetensors")


def test_error_truncated_weights(broken, tmp_path):
    p = broken / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    expect_error(broken, tmp_path, "past the end of the file", "model.safetensors")


def test_error_garbage_weights(broken, tmp_path):
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at all")
    expect_error(broken, tmp_path, "unreadable safetensors header", "model.safetensors")


def test_error_unreadable_tokenizer(broken, tmp_path):
    (broken / "tokenizer.json").write_text("{ this is not json")
    expect_error(broken, tmp_path, "unreadable tokenizer", "tokenizer.json")


def test_error_unsupported_tokenizer(broken, tmp_path):
    tj = json.loads((broken / "tokenizer.json").read_text())
    tj["model"]["type"] = "WordPiece"
    (broken / "tokenizer.json").write_text(json.dumps(tj))
    expect_error(broken, tmp_path, "unsupported tokenizer", "tokenizer.json")


def test_error_unknown_pre_tokenizer(broken, tmp_path):
    tj = json.loads((broken / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (broken / "tokenizer.json").write_text(json.dumps(tj))
    expect_error(broken, tmp_path, "unrecognized pre-tokenizer", "tokenizer.json")


def test_error_missing_tokenizer(broken, tmp_path):
    (broken / "tokenizer.json").unlink()
    expect_error(broken, tmp_path, "no tokenizer.json or tokenizer.model", str(broken))


def test_error_tokenizer_larger_than_config(broken, tmp_path):
    edit_config(broken, vocab_size=1000)
    rewrite_weights(broken, lambda w: w.update({k: w[k][:1000] for k in ("model.embed_tokens.weight", "lm_head.weight")}))
    expect_error(broken, tmp_path, "1013 tokens but config.json vocab_size is 1000", "tokenizer.json")


def test_error_bad_config(broken, tmp_path):
    edit_config(broken, hidden_size="big")
    expect_error(broken, tmp_path, "'hidden_size' must be a positive integer", "config.json")
    (broken / "config.json").write_text("[1, 2")
    expect_error(broken, tmp_path, "unreadable", "config.json")
    (broken / "config.json").unlink()
    expect_error(broken, tmp_path, "no config.json", str(broken))


def test_error_unsupported_rope_scaling(broken, tmp_path):
    edit_config(broken, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    expect_error(broken, tmp_path, "rope scaling type 'yarn' is not supported", "config.json")


def test_error_missing_shard(tiny_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs("gqa3-sharded-padded"), d)
    (d / "model-00002-of-00002.safetensors").unlink()
    expect_error(d, tmp_path, "shard 'model-00002-of-00002.safetensors' is missing", "model.safetensors.index.json")


def test_error_bad_source(tmp_path):
    expect_error(tmp_path / "nope", tmp_path, "no such directory")
    (tmp_path / "file.txt").write_text("x")
    expect_error(tmp_path / "file.txt", tmp_path, "not a checkpoint directory")
    with pytest.raises(ConvertError, match="unknown outtype"):
        convert(tmp_path, tmp_path / "o.gguf", outtype="q3_k")


def test_interrupt_leaves_no_partial_file(tiny_dirs, tmp_path, monkeypatch):
    from sepedge.convert import quants
    real, calls = quants.quantize, []

    def interrupted(rows, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(rows, qtype)

    monkeypatch.setattr(quants, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dirs("mha-d64"), tmp_path / "out.gguf", outtype="q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []
