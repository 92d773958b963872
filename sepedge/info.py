"""`sepedge info`: what a GGUF file holds, read with gguf's GGUFReader (metadata only)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import gguf

from . import sepllm
from . import vocab as V
from .errors import SepedgeError


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise SepedgeError(f"{path}: no such file") from None
    except Exception as e:  # GGUFReader raises assorted errors on malformed files
        raise SepedgeError(f"{path}: not a readable GGUF file: {e}") from None


def field(r: gguf.GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def summary(path: str | os.PathLike) -> dict:
    """Architecture, sizes, tensor types and the separator set of a GGUF file."""
    r = read_gguf(path)
    arch = field(r, "general.architecture", "?")
    hp = {k: field(r, f"{arch}.{key}") for k, key in (
        ("n_layer", "block_count"), ("n_embd", "embedding_length"), ("n_ff", "feed_forward_length"),
        ("n_head", "attention.head_count"), ("n_head_kv", "attention.head_count_kv"),
        ("n_ctx_train", "context_length"), ("rope_theta", "rope.freq_base"),
        ("rms_eps", "attention.layer_norm_rms_epsilon"), ("head_dim", "rope.dimension_count"))}
    types = Counter()
    type_bytes = Counter()
    for t in r.tensors:
        types[t.tensor_type.name] += 1
        type_bytes[t.tensor_type.name] += int(t.n_bytes)
    tokens = field(r, "tokenizer.ggml.tokens", [])
    token_types = field(r, "tokenizer.ggml.token_type", [V.TOKEN_NORMAL] * len(tokens))
    model = field(r, "tokenizer.ggml.model", "gpt2")
    bos = field(r, "tokenizer.ggml.bos_token_id")
    sep_ids = field(r, sepllm.KEY_SEPARATORS)
    sep_source = "file"
    if sep_ids is None and tokens:
        sep_ids, sep_source = V.derive_separator_ids(tokens, token_types, model, bos), "derived (not in file)"
    ftype = field(r, "general.file_type")
    return {
        "path": str(path), "file_bytes": Path(path).stat().st_size, "architecture": arch,
        "name": field(r, "general.name"),
        "file_type": gguf.LlamaFileType(ftype).name if ftype in gguf.LlamaFileType._value2member_map_ else ftype,
        "n_params": sum(int(t.n_elements) for t in r.tensors), "n_tensors": len(r.tensors), **hp,
        "n_vocab": len(tokens), "tokenizer": model, "pre": field(r, "tokenizer.ggml.pre"),
        "bos_id": bos, "eos_id": field(r, "tokenizer.ggml.eos_token_id"),
        "has_chat_template": "tokenizer.chat_template" in r.fields,
        "tensor_types": {k: {"count": types[k], "bytes": type_bytes[k]} for k in sorted(types, key=lambda k: -type_bytes[k])},
        "sepllm": {name: field(r, sepllm.key(name)) for name in sepllm.DEFAULTS},
        "separators_source": sep_source,
        "separators": [{"id": i, "text": V.token_text(tokens[i], token_types[i], model) or tokens[i]}
                       for i in (sep_ids or []) if 0 <= i < len(tokens)],
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def format_summary(s: dict) -> str:
    lines = [
        f"file          {s['path']} ({_size(s['file_bytes'])})",
        f"architecture  {s['architecture']}" + (f"  ({s['name']})" if s["name"] else ""),
        f"file type     {s['file_type']}",
        f"parameters    {s['n_params'] / 1e6:.2f} M in {s['n_tensors']} tensors",
        f"layers        {s['n_layer']}   n_embd {s['n_embd']}   n_ff {s['n_ff']}   "
        f"heads {s['n_head']} (kv {s['n_head_kv']})   head_dim {s['head_dim']}",
        f"context       {s['n_ctx_train']} (training)   rope base {s['rope_theta']:g}   rms eps {s['rms_eps']:g}"
        if s["n_ctx_train"] is not None else "context       ?",
        f"vocabulary    {s['n_vocab']} tokens, {s['tokenizer']} / {s['pre']}, bos {s['bos_id']}, eos {s['eos_id']}"
        + (", chat template" if s["has_chat_template"] else ""),
        "tensor types  " + ", ".join(f"{k} x{v['count']} ({_size(v['bytes'])})" for k, v in s["tensor_types"].items()),
        "sepllm        " + ("  ".join(f"{k} {v}" for k, v in s["sepllm"].items() if v is not None) or "no defaults in file"),
        f"separators    {len(s['separators'])} tokens, {s['separators_source']}:",
    ]
    items = [f"{t['id']}:{t['text']!r}" for t in s["separators"]]
    row = "   "
    for item in items:
        if len(row) + len(item) > 100:
            lines.append(row)
            row = "   "
        row += " " + item
    if items:
        lines.append(row)
    return "\n".join(lines)
