"""Seed inputs for the fuzz harnesses: tiny random models in every output type of the converter.

    python native/fuzz/make_seeds.py OUT_DIR

writes OUT_DIR/gguf/*.gguf (the loader's seed corpus) and OUT_DIR/models.txt (the decode harness's
models, one path a line: it reads them from $SEPEDGE_FUZZ_MODELS). The models are small (vocabulary
of about 300 tokens, 1-2 layers) so that one fuzz input runs in well under a millisecond."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import fixtures  # noqa: E402

from sepedge.convert import convert  # noqa: E402

SPECS = [
    fixtures.TinySpec("fuzz-mha", n_embd=32, n_layer=1, n_head=2, n_head_kv=2, n_ff=64, n_vocab=300, pre="gpt-2"),
    fixtures.TinySpec("fuzz-gqa-tied", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=96, n_vocab=320,
                      tied=True, pre="llama-bpe"),
    fixtures.TinySpec("fuzz-qwen2", n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64, n_vocab=290,
                      pre="qwen2", arch="qwen2"),
]
OUTTYPES = {"fuzz-mha": ["f32", "f16", "q4_0", "q8_0"], "fuzz-gqa-tied": ["q4_1", "bf16"], "fuzz-qwen2": ["q8_0"]}


def main(out: Path) -> None:
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    models = []
    for spec in SPECS:
        src = fixtures.make_tiny_checkpoint(spec, out / "hf" / spec.name)
        for t in OUTTYPES[spec.name]:
            models.append(convert(src, out / "gguf" / f"{spec.name}-{t}.gguf", outtype=t, progress=False))
    (out / "models.txt").write_text("".join(f"{p.resolve()}\n" for p in models))
    print(f"{len(models)} models in {out / 'gguf'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
