"""GGUF -> GGUF with other tensor types (as llama-quantize): every tensor is dequantized with the
`gguf` package and quantized again with the converter's quantizers, the types chosen per tensor as
`convert` chooses them (norms stay f32, the output head gets Q6_K under the 4-bit types, ...).

    from sepedge.convert import requantize
    requantize("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import ConvertError
from . import CHUNK_VALUES, FILE_TYPES, OUTTYPES, copy_fields, quants, tensor_type
from .writer import OutTensor, write_gguf

# Source types whose values requantizing does not degrade further (llama-quantize quantizes these
# freely and asks for --allow-requantize otherwise).
FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}


def requantize(src: str | os.PathLike, out: str | os.PathLike, outtype: str, *, allow_requantize: bool = False,
               progress: bool = True) -> Path:
    """Write `src` (a GGUF file) with its weights in `outtype` (f32, f16, bf16, q8_0, q4_0, q4_1,
    q4_k_m) to `out`. Metadata is copied, general.file_type updated. Tensors that already have the
    chosen type are copied byte for byte. A source with quantized weights is refused unless
    allow_requantize (quantizing twice loses more than quantizing once from the float weights)."""
    src, out = Path(src), Path(out)
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    if not src.is_file():
        raise ConvertError(f"{src}: no such file")
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output would overwrite the input")
    try:
        r = gguf.GGUFReader(src)
    except Exception as e:  # GGUFReader raises ValueError, KeyError, struct/numpy errors on bad files
        raise ConvertError(f"{src}: not a readable GGUF file: {e}") from None
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if "general.architecture" not in fields:
        raise ConvertError(f"{src}: no general.architecture key")
    arch = fields["general.architecture"].contents()
    names = {t.name for t in r.tensors}
    n_layer = fields.get(f"{arch}.block_count")
    hp = SimpleNamespace(tied="output.weight" not in names, n_layer=int(n_layer.contents()) if n_layer else 0)
    quantized = sorted({QT(t.tensor_type).name for t in r.tensors if QT(t.tensor_type) not in FLOAT_TYPES})
    if quantized and not allow_requantize:
        raise ConvertError(f"{src}: the weights are quantized already ({', '.join(quantized)}); requantizing loses "
                           "quality: convert from the float weights, or pass allow_requantize (--allow-requantize)")

    tensors = []
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: (rows, cols)
        src_type = QT(t.tensor_type)
        qtype = tensor_type(t.name, shape, outtype, hp)
        if qtype == src_type:
            tensors.append(OutTensor(t.name, shape, qtype, int(t.n_bytes), lambda t=t: _raw(t)))
            continue
        if src_type not in quants.QUANTIZERS and src_type not in FLOAT_TYPES:
            try:
                gguf.quants.dequantize(np.asarray(t.data)[:1], src_type)
            except Exception:
                raise ConvertError(f"{src}: tensor {t.name} has type {src_type.name}, which cannot be dequantized") from None
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        tensors.append(OutTensor(t.name, shape, qtype, n_rows * quants.row_nbytes(qtype, shape[-1]),
                                 lambda t=t, shape=shape, qtype=qtype: _requantized(t, shape, qtype)))

    def metadata(w: gguf.GGUFWriter) -> None:
        copy_fields(w, fields, src, skip=lambda key: key == "general.file_type")
        w.add_file_type(FILE_TYPES[outtype])

    return write_gguf(out, arch, metadata, tensors, progress, desc=f"{src.name} -> {outtype}")


def _raw(t) -> Iterator[np.ndarray]:
    yield np.asarray(t.data).reshape(-1).view(np.uint8)


def _requantized(t, shape: tuple[int, ...], qtype: QT) -> Iterator[np.ndarray]:
    n_cols = shape[-1]
    data = np.asarray(t.data)
    rows = data.reshape(-1, data.shape[-1])  # one row of values (or of their bytes) per matrix row
    step = max(1, CHUNK_VALUES // n_cols)
    for r0 in range(0, len(rows), step):
        x = gguf.quants.dequantize(rows[r0:r0 + step], QT(t.tensor_type)).astype(np.float32).reshape(-1, n_cols)
        yield quants.quantize(x, qtype)
