"""A GGUF with a real model's shapes, tensor types and vocabulary, and random weights: decode speed
does not depend on the values, and such a file is written in seconds where quantizing 8B real
values takes an hour. Quantized blocks are random bytes with small f16 scales (every code occurs,
no NaN); norms are near 1.

    python benchmarks/random_gguf.py llama3-8b q4_k_m --vocab VOCAB.gguf -o OUT.gguf

VOCAB.gguf supplies the tokenizer keys (llama.cpp's models/ggml-vocab-llama-bpe.gguf is Llama 3's;
`python tests/fixtures.py smollm2-vocab OUT` writes SmolLM2's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sepedge import sepllm  # noqa: E402
from sepedge.convert import add_model_keys, tensor_type  # noqa: E402
from sepedge.convert import _add_sepllm_keys, _separator_ids  # noqa: E402
from sepedge.convert import quants  # noqa: E402
from sepedge.convert.arch import LLAMA, HParams  # noqa: E402
from sepedge.convert.writer import OutTensor, write_gguf  # noqa: E402

SHAPES = {  # config.json of the real models
    "llama3-8b": HParams(n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336, head_dim=128,
                         n_ctx_train=8192, rms_eps=1e-5, rope_theta=500000.0, rope_scaling=None, tied=False,
                         name="Meta-Llama-3-8B-random"),
    "smollm2-135m": HParams(n_vocab=49152, n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, head_dim=64,
                            n_ctx_train=8192, rms_eps=1e-5, rope_theta=100000.0, rope_scaling=None, tied=True,
                            name="SmolLM2-135M-random"),
    # not a real model: SmolLM2's vocabulary (real text, real separators) on a few small layers, for
    # benchmarks of memory over long streams where only the cache matters
    "tiny-smollm2-vocab": HParams(n_vocab=49152, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768, head_dim=64,
                                  n_ctx_train=8192, rms_eps=1e-5, rope_theta=100000.0, rope_scaling=None, tied=True,
                                  name="tiny-random-smollm2-vocab"),
}
# byte offsets of each block's f16 scale fields
SCALE_FIELDS = {gguf.GGMLQuantizationType.Q8_0: [0], gguf.GGMLQuantizationType.Q4_0: [0],
                gguf.GGMLQuantizationType.Q4_1: [0, 2], gguf.GGMLQuantizationType.Q5_0: [0],
                gguf.GGMLQuantizationType.Q4_K: [0, 2], gguf.GGMLQuantizationType.Q5_K: [0, 2],
                gguf.GGMLQuantizationType.Q6_K: [208]}
CHUNK = 1 << 26  # bytes generated at a time


def random_bytes(qtype, shape, rng):
    n_rows, n_cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    if qtype == gguf.GGMLQuantizationType.F32:
        yield (1 + 0.1 * rng.standard_normal(n_rows * n_cols)).astype(np.float32).view(np.uint8)
        return
    if qtype == gguf.GGMLQuantizationType.F16:
        yield (0.02 * rng.standard_normal(n_rows * n_cols)).astype(np.float16).view(np.uint8)
        return
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * n_cols // block
    step = max(1, CHUNK // size)
    for b0 in range(0, n_blocks, step):
        n = min(step, n_blocks - b0)
        # the bit generator's raw words: ~5x the rate of Generator.bytes, and already a writable array
        b = rng.bit_generator.random_raw((n * size + 7) // 8).view(np.uint8)[:n * size].reshape(n, size)
        for off in SCALE_FIELDS[qtype]:
            b[:, off:off + 2] = (0.002 * rng.standard_normal(n)).astype(np.float16).view(np.uint8).reshape(-1, 2)
        yield b.reshape(-1)


def write(shape: str, outtype: str, vocab: Path, out: Path, seed: int = 0) -> Path:
    hp = SHAPES[shape]
    arch = LLAMA
    rng = np.random.default_rng(seed)
    r = gguf.GGUFReader(vocab)
    fields = {k: f for k, f in r.fields.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) != hp.n_vocab:
        raise SystemExit(f"{vocab}: {len(tokens)} tokens, {shape} has {hp.n_vocab}")
    bos = fields["tokenizer.ggml.bos_token_id"].contents() if "tokenizer.ggml.bos_token_id" in fields else None
    sep_ids = _separator_ids(tokens, fields["tokenizer.ggml.token_type"].contents(),
                             fields["tokenizer.ggml.model"].contents(), bos, None)
    tensors = []
    for p in arch.tensor_plan(hp):
        qtype = tensor_type(p.name, p.shape, outtype, hp)
        n_rows = p.shape[0] if len(p.shape) == 2 else 1
        tensors.append(OutTensor(p.name, p.shape, qtype, n_rows * quants.row_nbytes(qtype, p.shape[-1]),
                                 lambda q=qtype, s=p.shape: random_bytes(q, s, rng)))

    def metadata(w: gguf.GGUFWriter) -> None:
        add_model_keys(w, arch, hp, outtype)
        for key, f in fields.items():
            sub = f.types[1] if len(f.types) > 1 else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        _add_sepllm_keys(w, sep_ids, dict(sepllm.DEFAULTS))

    return write_gguf(out, arch.name, metadata, tensors, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("outtype", choices=["q4_0", "q4_1", "q8_0", "q4_k_m"])
    ap.add_argument("--vocab", type=Path, required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    print(write(args.shape, args.outtype, args.vocab, args.out))


if __name__ == "__main__":
    main()
