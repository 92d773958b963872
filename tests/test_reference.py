"""The torch reference against Hugging Face transformers, and GGUF loading against HF loading."""

import secrets

import pytest
import torch

from fixtures import SPEC_BY_NAME, SPECS
from sepedge.convert import convert
from sepedge.reference import Transformer

# float32 logits of the same weights computed two ways (reference vs transformers): max |diff| over
# the logits' scale
MAX_F32_REL_DIFF = 2e-5
# float64 reference, HF directory (rotate-half) vs GGUF (permuted rows, adjacent pairs)
MAX_F64_DIFF = 1e-9
# f16 / q8_0 GGUF weights vs the original: relative to the logits' scale
MAX_QUANT_REL_DIFF = {"f16": 5e-3, "q8_0": 3e-2}


@pytest.fixture
def tokens(request):
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    g = torch.Generator().manual_seed(seed)

    def draw(n_vocab, n=48):
        return torch.randint(0, n_vocab, (n,), generator=g)

    return draw


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_transformers(tiny_dirs, tokens, spec):
    from transformers import AutoModelForCausalLM

    d = tiny_dirs(spec.name)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if spec.arch == "qwen2" else "LlamaForCausalLM")
    ours = Transformer.from_hf(d, dtype=torch.float32)
    t = tokens(spec.n_vocab)
    with torch.no_grad():
        expected = hf(t[None]).logits[0]
    assert rel_diff(ours(t), expected) <= MAX_F32_REL_DIFF


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_gguf_equals_hf(tiny_dirs, tmp_path, tokens, spec):
    d = tiny_dirs(spec.name)
    t = tokens(spec.n_vocab)
    expected = Transformer.from_hf(d, dtype=torch.float64)(t)
    path = convert(d, tmp_path / "f32.gguf", outtype="f32", progress=False)
    assert float((Transformer.from_gguf(path, dtype=torch.float64)(t) - expected).abs().max()) <= MAX_F64_DIFF
    for outtype, tol in MAX_QUANT_REL_DIFF.items():
        path = convert(d, tmp_path / f"{outtype}.gguf", outtype=outtype, progress=False)
        assert rel_diff(Transformer.from_gguf(path, dtype=torch.float64)(t), expected) <= tol, outtype


def test_attention_mask_is_honoured(tiny_dirs):
    """A key masked out for a query changes that query's output, and nothing before it."""
    d = tiny_dirs("mha-d64")
    m = Transformer.from_hf(d, dtype=torch.float64)
    t = torch.arange(5, 25)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    mask[15:, 3] = False
    a, b = m(t), m(t, mask=mask)
    assert torch.equal(a[:15], b[:15]) and (a[15:] - b[15:]).abs().max() > 1e-6


def test_smollm2_greedy_paris(smollm2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = tok.encode("The capital of France is").ids
    assert ids == [504, 3575, 282, 4649, 314]
    m = Transformer.from_hf(smollm2_dir, dtype=torch.float32)
    out = tok.decode(m.greedy(ids, 4))
    assert out.startswith(" Paris"), out


def test_spec_table_covers_the_shapes_asked_for():
    kinds = {(s.n_head == s.n_head_kv, s.dim) for s in SPECS}
    assert (True, 64) in kinds and (False, 128) in kinds  # MHA, GQA; head_dim 64 and 128
    assert any(s.tied for s in SPECS) and any(not s.tied for s in SPECS)
    assert any((s.rope_scaling or {}).get("rope_type") == "llama3" for s in SPECS)
    assert any(s.n_vocab % 2 for s in SPECS)
    assert SPEC_BY_NAME["odd-rows-linear-rope"].n_embd % 32  # rows that do not split into blocks
