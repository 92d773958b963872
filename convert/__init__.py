"""Hugging Face checkpoint -> GGUF (llama.cpp-compatible) with SepLLM separator metadata.

    from sepedge.convert import convert
    convert("meta-llama/Meta-Llama-3-8B", "llama3-8b-q8_0.gguf", outtype="q8_0")

The conversion streams tensor by tensor and row chunk by row chunk, so memory use does not grow
with the size of the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from .. import sepllm
from .. import vocab as V
from ..errors import ConvertError
from . import quants, source
from .arch import Arch, HParams, TensorPlan, find_arch, permute_rows
from .checkpoint import SourceTensor, open_checkpoint
from .tokenizer import GGUFVocab, load_vocab
from .writer import OutTensor, write_gguf

__all__ = ["convert", "requantize", "ConvertError", "OUTTYPES"]

# outtype -> the type most weights get, and general.file_type
OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1,
            "q4_k_m": QT.Q4_K}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
# llama.cpp's replacements when a row does not split into the type's blocks (then f16)
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}
DEFAULT_OUTTYPE = "f16"

# Rows are read and quantized this many values at a time (64 MiB of float32).
CHUNK_VALUES = 1 << 24


def add_model_keys(w: gguf.GGUFWriter, arch, hp, outtype: str) -> None:
    """general.* and the architecture's hyperparameter keys."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hp.name)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch.add_keys(w, hp)


def convert(src: str | os.PathLike, out: str | os.PathLike | None = None, *, outtype: str | None = None,
            separators: Sequence[str | int] | None = None, n_init: int = sepllm.DEFAULTS["n_init"],
            n_sep: int = sepllm.DEFAULTS["n_sep"], n_local: int = sepllm.DEFAULTS["n_local"],
            n_cache: int = sepllm.DEFAULTS["n_cache"], revision: str | None = None,
            progress: bool = True) -> Path:
    """Convert `src` to a GGUF file and return its path.

    Args:
        src: a local HF checkpoint directory, a Hugging Face Hub repo id, or a GGUF file. A GGUF
            file is copied tensor for tensor with fresh `sepllm.*` metadata (no requantization).
        out: output path; default `<model name>-<OUTTYPE>.gguf` in the current directory.
        outtype: f32, f16 (default), bf16, q8_0, q4_0, q4_1, or auto (bf16, or f16 for f16 sources).
        separators: override of the separator set: token texts (every token that reads exactly
            that text) and token ids. Default: derived from the vocabulary (SEPLLM.md §2).
        n_init, n_sep, n_local, n_cache: SepLLM cache defaults stored in the file.
        revision: hub revision (branch, tag or commit) when `src` is a repo id.
        progress: show a progress bar on stderr.
    """
    try:
        sepllm.check_sizes(n_init, n_sep, n_local, n_cache)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    sizes = {"n_init": n_init, "n_sep": n_sep, "n_local": n_local, "n_cache": n_cache}
    if str(src).endswith(".gguf") and Path(src).is_file():
        if outtype not in (None, "auto"):
            raise ConvertError(f"{src}: requantizing a GGUF file is not supported; convert from the HF checkpoint")
        return _convert_gguf(Path(src), out, separators, sizes, progress)
    if outtype is None:
        outtype = DEFAULT_OUTTYPE
    if outtype not in OUTTYPES and outtype != "auto":
        raise ConvertError(f"unknown outtype {outtype!r} (choose from {', '.join([*OUTTYPES, 'auto'])})")

    model_dir = source.resolve(src, revision)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{config_path}: unreadable: {e}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: not a JSON object")
    arch = find_arch(config, str(config_path))
    hp = arch.hparams(config, str(config_path))
    hp.name = _model_name(src, model_dir, hp.name)
    sources = open_checkpoint(model_dir)
    plan = arch.tensor_plan(hp)
    _check_tensors(model_dir, arch, hp, plan, sources)
    vocab = load_vocab(model_dir, hp.n_vocab)
    sep_ids = _separator_ids(vocab.tokens, vocab.token_types, vocab.model, vocab.bos_id, separators)

    if outtype == "auto":
        outtype = "f16" if sources["model.embed_tokens.weight"].dtype == "F16" else "bf16"
    tensors = [_out_tensor(p, sources.get(p.hf_name), tensor_type(p.name, p.shape, outtype, hp)) for p in plan]
    out = Path(out) if out is not None else Path.cwd() / f"{hp.name}-{outtype.upper()}.gguf"

    def metadata(w: gguf.GGUFWriter) -> None:
        add_model_keys(w, arch, hp, outtype)
        vocab.add_to(w)
        _add_sepllm_keys(w, sep_ids, sizes)

    return write_gguf(out, arch.name, metadata, tensors, progress, desc=f"{hp.name} -> {outtype}")


def _model_name(src, model_dir: Path, config_name: str) -> str:
    if not Path(src).expanduser().is_dir():  # a hub id: the snapshot directory is named by commit
        return str(src).rstrip("/").split("/")[-1]
    name = Path(config_name).name if config_name else model_dir.resolve().name
    return re.sub(r"[^\w.-]+", "-", name) or "model"


def _check_tensors(model_dir: Path, arch: Arch, hp: HParams, plan: list[TensorPlan],
                   sources: dict[str, SourceTensor]) -> None:
    wanted = {p.hf_name: p for p in plan if p.hf_name}
    missing = sorted(set(wanted) - set(sources))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConvertError(f"{model_dir}: missing tensors {', '.join(missing[:5])}{more}")
    extra = sorted(set(sources) - set(wanted) - arch.ignored_source_tensors(hp))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ConvertError(f"{sources[extra[0]].path}: unexpected tensors {', '.join(extra[:5])}{more} "
                           f"(not part of a {arch.name} model with this config.json)")
    for name, p in wanted.items():
        t = sources[name]
        if t.shape != p.shape:
            raise ConvertError(f"{t.path}: tensor {name!r} has shape {list(t.shape)}, config.json implies {list(p.shape)}")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that keep attn_v and ffn_down at higher precision."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, hp: HParams) -> QT:
    """The type of one tensor, following llama.cpp's choices (llama-quantize's for the quantized
    mixes): norms, biases and rope factors stay f32; the output head (or the tied embedding) gets
    Q6_K with the 4-bit types; q4_k_m also gives Q6_K to attn_v and ffn_down in the layers
    use_more_bits picks; rows that do not split into blocks fall back as llama.cpp does."""
    if len(shape) == 1:
        return QT.F32
    qtype = OUTTYPES[outtype]
    head = name == "output.weight" or (hp.tied and name == "token_embd.weight")
    if head and qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K):
        qtype = QT.Q6_K
    elif outtype == "q4_k_m" and name.endswith(("attn_v.weight", "ffn_down.weight")):
        if _use_more_bits(int(name.split(".")[1]), hp.n_layer):
            qtype = QT.Q6_K
    while not quants.can_quantize(qtype, shape[-1]):
        qtype = FALLBACK.get(qtype, QT.F16)
    return qtype


def _out_tensor(p: TensorPlan, src: SourceTensor | None, qtype: QT) -> OutTensor:
    n_cols = p.shape[-1]
    n_rows = p.shape[0] if len(p.shape) == 2 else 1
    return OutTensor(p.name, p.shape, qtype, n_rows * quants.row_nbytes(qtype, n_cols),
                     lambda: _chunks(p, src, qtype))


def _chunks(p: TensorPlan, src: SourceTensor | None, qtype: QT) -> Iterator[np.ndarray]:
    if p.generate is not None:
        yield quants.quantize(p.generate().reshape(1, -1), qtype)
        return
    if len(p.shape) == 1:
        x = src.read_rows(0, 1)
        if p.permute_heads:
            x = permute_rows(x.reshape(-1, 1), p.permute_heads).reshape(1, -1)
        yield quants.quantize(x, qtype)
        return
    n_rows, n_cols = p.shape
    step = max(1, CHUNK_VALUES // n_cols)
    head_rows = n_rows // p.permute_heads if p.permute_heads else 1
    step = max(head_rows, step // head_rows * head_rows)  # permuted tensors are cut at head boundaries
    for r0 in range(0, n_rows, step):
        x = src.read_rows(r0, min(n_rows, r0 + step))
        if p.permute_heads:
            x = permute_rows(x, len(x) // head_rows)
        yield quants.quantize(x, qtype)


def _separator_ids(tokens, token_types, model: str, bos_id: int | None,
                   separators: Sequence[str | int] | None) -> list[int]:
    try:
        if separators is not None:
            return V.resolve_separators(separators, tokens, token_types, model)
        return V.derive_separator_ids(tokens, token_types, model, bos_id)
    except ValueError as e:
        raise ConvertError(f"separators: {e}") from None


def _add_sepllm_keys(w: gguf.GGUFWriter, sep_ids: list[int], sizes: dict[str, int]) -> None:
    w.add_key_value(sepllm.KEY_SEPARATORS, sep_ids, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for name, value in sizes.items():
        w.add_uint32(sepllm.key(name), value)


# ---------------------------------------------------------------------------------------------
# GGUF -> GGUF: copy every key and tensor as they are, with fresh sepllm.* metadata.

_COPY_CHUNK = 64 << 20


def copy_fields(w: gguf.GGUFWriter, fields: dict, path: Path, skip=lambda key: False) -> None:
    """Every metadata key of a GGUFReader (but general.architecture, which the writer adds, and what
    `skip` names) into a writer, with its type."""
    for key, f in fields.items():
        if key == "general.architecture" or skip(key):
            continue
        if key == "general.alignment":  # also sets the padding the writer uses
            w.add_custom_alignment(int(f.contents()))
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(f.types) > 1 and f.types[1] == gguf.GGUFValueType.ARRAY:
                raise ConvertError(f"{path}: nested array in key {key!r} is not supported")
            sub = f.types[1] if len(f.types) > 1 else gguf.GGUFValueType.UINT8
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)
        else:
            w.add_key_value(key, f.contents(), vtype)


def _convert_gguf(path: Path, out, separators, sizes: dict[str, int], progress: bool) -> Path:
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError, KeyError, struct/numpy errors on bad files
        raise ConvertError(f"{path}: not a readable GGUF file: {e}") from None
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch_field = fields.get("general.architecture")
    if arch_field is None:
        raise ConvertError(f"{path}: no general.architecture key")
    if "tokenizer.ggml.tokens" not in fields:
        raise ConvertError(f"{path}: no vocabulary (tokenizer.ggml.tokens)")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields \
        else [V.TOKEN_NORMAL] * len(tokens)
    model = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else "gpt2"
    bos = fields["tokenizer.ggml.bos_token_id"].contents() if "tokenizer.ggml.bos_token_id" in fields else None
    sep_ids = _separator_ids(tokens, types, model, bos, separators)
    out = Path(out) if out is not None else Path.cwd() / f"{path.stem}.sepedge.gguf"
    if out.resolve() == path.resolve():
        raise ConvertError(f"{out}: the output would overwrite the input")

    def metadata(w: gguf.GGUFWriter) -> None:
        copy_fields(w, fields, path, skip=lambda key: key.startswith("sepllm."))
        _add_sepllm_keys(w, sep_ids, sizes)

    def chunks(offset: int, nbytes: int) -> Iterator[np.ndarray]:
        with open(path, "rb") as f:
            for pos in range(0, nbytes, _COPY_CHUNK):
                data = os.pread(f.fileno(), min(_COPY_CHUNK, nbytes - pos), offset + pos)
                if len(data) != min(_COPY_CHUNK, nbytes - pos):
                    raise ConvertError(f"{path}: truncated tensor data")
                yield np.frombuffer(data, dtype=np.uint8)

    tensors = [OutTensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.n_bytes),
                         lambda t=t: chunks(int(t.data_offset), int(t.n_bytes))) for t in r.tensors]
    return write_gguf(out, arch_field.contents(), metadata, tensors, progress, desc=path.name)


from .requantize import requantize  # noqa: E402  (uses the helpers above)
