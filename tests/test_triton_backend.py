"""The Triton forward pass (sepedge.triton_backend) end to end on tiny models, `full` kv_mode: logits of
a chunked prompt and of single-token steps against the CPU engine and the float64 torch reference.
Without a GPU the kernels run through Triton's interpreter on CPU tensors."""

import os
import secrets

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at their first import
pytest.importorskip("triton")

import fixtures  # noqa: E402
from sepedge import Engine  # noqa: E402
from sepedge.reference import Transformer  # noqa: E402
from sepedge.triton_backend import TritonForward  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# max |triton - other| / max |other| over the logits. Against the float64 reference: float32 sums,
# and half-precision operands in the prefill products of quantized weights. Against the CPU engine:
# its 8-bit activations for quantized weights dominate (see test_engine_logits).
MAX_REL_REFERENCE = {"f32": 1e-5, "q8_0": 3e-3, "q4_k_m": 3e-3}     # measured 2e-7, 5e-4, 5e-4
MAX_REL_CPU = {"f32": 1e-5, "q8_0": 3e-2, "q4_k_m": 3e-2}           # measured 2e-7, 1.0e-2, 1.2e-2
N_PROMPT, N_STEPS = 19, 4


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("spec,outtype", [("gqa-d128-llama31", "f32"), ("qwen2-untied-odd", "q8_0"),
                                          ("mha-d64", "q4_k_m")])
def test_logits_match_cpu_engine(gguf_path, spec, outtype):
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    s = fixtures.SPEC_BY_NAME[spec]
    path = gguf_path(spec, outtype)
    tokens = np.random.default_rng(seed).integers(0, s.n_tokens or s.n_vocab, N_PROMPT + N_STEPS).tolist()
    with Engine(path, n_ctx=64, kv_type="f32") as llm:
        cpu = llm.eval_logits(tokens)
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    fwd = TritonForward(path, n_cells=64, device=DEVICE, kv_dtype=torch.float32)
    got = torch.cat([fwd.decode(tokens[:N_PROMPT])] + [fwd.decode([t]) for t in tokens[N_PROMPT:]]).cpu().numpy()
    print(f"rel to reference {rel(got, ref):.3g}, to the CPU engine {rel(got, cpu):.3g}")
    assert rel(got, ref) <= MAX_REL_REFERENCE[outtype]
    assert rel(got, cpu) <= MAX_REL_CPU[outtype]


def test_bad_input(gguf_path, monkeypatch):
    from sepedge import BackendError, InvalidArgumentError
    path = gguf_path("mha-d64", "f16")
    fwd = TritonForward(path, n_cells=8, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="exceed"):
        fwd.decode(list(range(9)))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        fwd.decode([fixtures.SPEC_BY_NAME["mha-d64"].n_vocab])
    with pytest.raises(InvalidArgumentError, match="no tokens"):
        fwd.decode([])
    assert fwd.n_past == 0  # nothing was fed
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(BackendError, match="GPU"):
            TritonForward(path)
