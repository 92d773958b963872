"""Lazy access to the tensors of a Hugging Face checkpoint (single or sharded safetensors).

Only the JSON headers are read up front. Tensor data is read row range by row range with
`pread`, never memory-mapped: mapped pages stay resident and would make peak RSS grow with the
size of the model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from ..errors import ConvertError

# safetensors dtype -> (bytes per element, numpy dtype used to read it); bf16 is widened by hand
DTYPES = {"F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, np.uint16)}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class SourceTensor:
    name: str
    path: Path
    dtype: str               # safetensors dtype name: F32, F16 or BF16
    shape: tuple[int, ...]   # PyTorch order, e.g. (out_features, in_features)
    offset: int              # absolute byte offset of the data in `path`

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def n_cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype][0]

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as float32, shape (r1 - r0, n_cols)."""
        size, np_dtype = DTYPES[self.dtype]
        count = (r1 - r0) * self.n_cols
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), count * size, self.offset + r0 * self.n_cols * size)
        if len(raw) != count * size:
            raise ConvertError(f"{self.path}: tensor {self.name!r} is truncated (file shorter than its header says)")
        x = np.frombuffer(raw, dtype=np_dtype)
        if self.dtype == "BF16":
            x = (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return x.astype(np.float32, copy=False).reshape(r1 - r0, self.n_cols)


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """Tensor descriptors of one .safetensors file, every offset checked against the file size."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, file_size - 8):
            raise ConvertError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: unreadable safetensors header: not a JSON object")
    data_start = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}; supported dtypes are "
                               f"{', '.join(DTYPES)}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ConvertError(f"{path}: malformed shape or offsets for tensor {name!r}")
        if end - begin != prod(shape) * DTYPES[dtype][0] or data_start + end > file_size:
            raise ConvertError(f"{path}: tensor {name!r} data does not fit its shape {list(shape)} "
                               f"or lies past the end of the file")
        tensors[name] = SourceTensor(name, path, dtype, shape, data_start + begin)
    return tensors


def _check_shard_name(index: Path, name) -> None:
    """A shard named by the index must lie inside the checkpoint directory: a relative path without
    '..' (checked on the text: symbolic links inside the directory, as in the Hugging Face cache's
    snapshots, stay allowed)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ConvertError(f"{index}: shard name {name!r} is not a file name")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or os.path.splitdrive(name)[0]:
        raise ConvertError(f"{index}: shard {name!r} lies outside the checkpoint directory; refused")


def open_checkpoint(model_dir: Path) -> dict[str, SourceTensor]:
    """All tensors of a checkpoint directory by HF name."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{index}: unreadable index ({e})") from None
        for name in files:
            _check_shard_name(index, name)
            if not (model_dir / name).is_file():
                raise ConvertError(f"{index}: shard {name!r} is missing from {model_dir}")
        paths = [model_dir / name for name in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pth"))
        hint = f" (found {', '.join(found[:3])}: PyTorch pickles are not read, for safety)" if found else ""
        raise ConvertError(f"{model_dir}: no *.safetensors weights{hint}")
    tensors: dict[str, SourceTensor] = {}
    for path in paths:
        for name, t in read_safetensors_header(path).items():
            if name in tensors:
                raise ConvertError(f"{path}: tensor {name!r} also appears in {tensors[name].path.name}")
            tensors[name] = t
    return tensors
