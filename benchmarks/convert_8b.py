"""Conversion of a Llama-3-8B-shaped checkpoint: wall time and peak RSS, sepedge vs llama.cpp.

Generates (once) a random bf16 checkpoint with the real Llama-3-8B shapes, 4 safetensors shards and
the real Llama-3 tokenizer (rebuilt from llama.cpp's ggml-vocab-llama-bpe.gguf), then converts it
with `sepedge convert` (q4_0 and q8_0) and with llama.cpp's convert_hf_to_gguf.py (q8_0; it cannot
write q4_0), each in its own process, and records wall time and peak RSS (ru_maxrss).

    python benchmarks/convert_8b.py [--workdir /tmp/sepedge-convert-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = {  # meta-llama/Meta-Llama-3-8B config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "attention_bias": False, "mlp_bias": False}
N_SHARDS = 4


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_random_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """A safetensors file of random bf16 values, written in 64 MiB pieces."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors:
            left = int(np.prod(shape))
            while left:
                n = min(left, 1 << 25)
                x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
                if name.endswith("norm.weight"):
                    x += np.float32(1)
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                left -= n


def make_checkpoint(d: Path) -> Path:
    if (d / "config.json").is_file():
        return d
    import llama_cpp
    from fixtures import vocab_fields
    from tokenizers import processors

    from sepedge.tokenizer import build_tokenizer

    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    llama_cpp.source_dir()
    f = vocab_fields("llama-bpe")
    tok = build_tokenizer(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], "gpt2", "llama-bpe",
                          f["tokenizer.ggml.merges"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=1))
    shapes = tensor_shapes(CONFIG)
    total = sum(int(np.prod(s)) for _, s in shapes)
    shards, cur, size = [[]], 0, 0
    for name, shape in shapes:  # cut into N_SHARDS shards of about equal size, in tensor order
        if size > total / N_SHARDS * (cur + 1) and cur < N_SHARDS - 1:
            shards.append([])
            cur += 1
        shards[-1].append((name, shape))
        size += int(np.prod(shape))
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"writing {fname}", flush=True)
        write_random_shard(tmp / fname, group, rng)
        weight_map |= {n: fname for n, _ in group}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                 "weight_map": weight_map}))
    tmp.rename(d)
    return d


def run(cmd: list[str], env=None) -> dict:
    """Wall time and peak RSS of a child process (ru_maxrss of that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {err[-2000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sepedge-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = make_checkpoint(args.workdir / "llama3-8b-random-bf16")
    print(f"checkpoint ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))

    import llama_cpp
    peer = llama_cpp.source_dir() / "convert_hf_to_gguf.py"
    sepedge = [sys.executable, "-m", "sepedge.cli", "convert", str(ckpt), "-q"]
    cases = [
        ("sepedge", "q8_0", sepedge + ["--outtype", "q8_0", "-o", str(args.workdir / "sepedge-q8_0.gguf")]),
        ("llama.cpp convert_hf_to_gguf.py", "q8_0",
         [sys.executable, str(peer), str(ckpt), "--outtype", "q8_0", "--outfile", str(args.workdir / "llamacpp-q8_0.gguf")]),
        ("sepedge", "q4_0", sepedge + ["--outtype", "q4_0", "-o", str(args.workdir / "sepedge-q4_0.gguf")]),
    ]
    rows = []
    for tool, outtype, cmd in cases:
        print(f"{tool} -> {outtype} ...", flush=True)
        r = run(cmd)
        out = Path(cmd[cmd.index("-o" if "-o" in cmd else "--outfile") + 1])
        rows.append({"tool": tool, "outtype": outtype, **r, "out_gb": out.stat().st_size / 1e9,
                     "cmd": " ".join(Path(c).name if c.startswith("/") and c.endswith((".py", "python", "python3")) else c
                                     for c in cmd)})
        print(f"  {r['wall_s']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if not args.keep:
            out.unlink()

    peer_row = rows[1]
    lines = [
        "# Converting a Llama-3-8B-shaped checkpoint",
        "",
        f"Machine: {machine()}.",
        f"Input: random bf16 weights with the Llama-3-8B shapes ({ckpt_bytes / 1e9:.2f} GB in {N_SHARDS} "
        "safetensors shards, vocab 128256 with the real Llama-3 tokenizer). Each conversion runs in its own "
        "process; peak RSS is that process's ru_maxrss. Target: peak RSS <= 2.5 GB.",
        "",
        "| tool | outtype | wall time (s) | peak RSS (GB) | output (GB) | time vs llama.cpp q8_0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['outtype']} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['out_gb']:.2f} | "
                     f"{r['wall_s'] / peer_row['wall_s']:.2f}x |")
    lines += ["", "Commands (run in this order, one after the other):", ""]
    lines += [f"    {r['cmd']}" for r in rows]
    lines += ["", "Reproduce: `python benchmarks/convert_8b.py` (needs the test extras: torch and transformers "
              "for llama.cpp's converter).", ""]
    out = ROOT / "benchmarks" / "results" / "convert_8b.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(ckpt)


if __name__ == "__main__":
    main()
