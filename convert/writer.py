"""Streaming GGUF output: header, KV pairs and tensor infos through gguf's GGUFWriter, then each
tensor's bytes in row chunks, into a temporary file that is renamed into place only at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from ..errors import ConvertError


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]                 # numpy order: (rows, cols) for matrices
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]  # yields the tensor's bytes as uint8 arrays, in order


@contextlib.contextmanager
def atomic_output(out: Path):
    """Yield a temporary path next to `out`; rename it to `out` on success, delete it otherwise
    (including on Ctrl-C), so a failed conversion never leaves a partial GGUF behind."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConvertError(f"{out}: the output directory does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    with _terminate_as_exit():
        try:
            yield tmp
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived during a conversion (exit status 128 + the signal's number)."""


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM and SIGHUP would end the process on the spot, leaving the partial file: while a file
    is written they raise Terminated instead, so the cleanup runs as for Ctrl-C. Only where the
    signal has its default action (a caller's own handler or SIG_IGN is kept) and in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def write_gguf(out: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: list[OutTensor], progress: bool = True, desc: str = "converting") -> Path:
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        add_metadata(w)
        for t in tensors:
            # a non-uint8 dtype tells GGUFWriter that `shape` is the logical shape, not a byte shape
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        align = w.data_alignment
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=desc,
                   disable=not progress, leave=False)
        try:
            for t in tensors:
                f.write(b"\0" * (-f.tell() % align))
                written = 0
                bar.set_postfix_str(t.name, refresh=False)
                for chunk in t.chunks():
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                    written += chunk.nbytes
                    bar.update(chunk.nbytes)
                if written != t.nbytes:  # a bug, not a user error: the plan promised another size
                    raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
            f.write(b"\0" * (-f.tell() % align))
        finally:
            bar.close()
            w.close()
    return out
