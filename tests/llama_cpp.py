"""llama.cpp, the peer: its source from the `llama-cpp-python` sdist on PyPI, built with CMake.

    python tests/llama_cpp.py build     # fetch + build the tools tests and benchmarks use
    python tests/llama_cpp.py build-server   # llama-server too (benchmarks/serve_bench.py; not the tests)

Tests find the binaries in .cache/llama.cpp/build/bin (or $SEPEDGE_LLAMA_CPP_BIN).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEPEDGE_TEST_CACHE") or ROOT / ".cache")
TARGETS = ["llama-simple", "llama-tokenize", "llama-completion", "llama-perplexity", "llama-bench"]
# Built on request only: the tests do not need it and it is the largest tool to compile.
SERVER_TARGET = "llama-server"


def source_dir() -> Path:
    """vendor/llama.cpp of the sdist, downloaded and unpacked once."""
    src = CACHE / "llama-cpp-python" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", tmp], check=True)
        (tarball,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        (unpacked,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        unpacked.rename(CACHE / "llama-cpp-python")
    return src


def vocab_file(name: str) -> Path:
    """One of llama.cpp's vocab-only GGUFs (models/ggml-vocab-<name>.gguf) with its .inp/.out tests."""
    return source_dir() / "models" / f"ggml-vocab-{name}.gguf"


def bin_dir() -> Path | None:
    d = Path(os.environ.get("SEPEDGE_LLAMA_CPP_BIN") or CACHE / "llama.cpp" / "build" / "bin")
    return d if all((d / t).is_file() for t in TARGETS) else None


def server_bin() -> Path | None:
    """llama-server, where built (build-server), next to the other tools."""
    d = Path(os.environ.get("SEPEDGE_LLAMA_CPP_BIN") or CACHE / "llama.cpp" / "build" / "bin")
    return d / SERVER_TARGET if (d / SERVER_TARGET).is_file() else None


def isa_flags() -> list[str]:
    """The machine's x86 vector extensions without AMX: GGML_NATIVE would turn on AMX where the CPU
    has it, and virtual machines that do not grant the AMX tile state kill llama.cpp with SIGILL at
    its first AMX instruction. Elsewhere, GGML_NATIVE as usual."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    if "avx2" not in flags:
        return ["-DGGML_NATIVE=ON"]
    wanted = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
              "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
              "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    return ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in wanted.items()]


def build(jobs: int = os.cpu_count() or 2, server: bool = False) -> Path:
    build_dir = CACHE / "llama.cpp" / "build"
    # the server's web UI is left out: it would be built with npm or downloaded, and no test needs it
    subprocess.run(["cmake", "-S", str(source_dir()), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    f"-DLLAMA_BUILD_SERVER={'ON' if server else 'OFF'}", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF", *isa_flags()], check=True,
                   stdout=subprocess.DEVNULL)
    targets = [*TARGETS, SERVER_TARGET] if server else TARGETS
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets], check=True,
                   stdout=subprocess.DEVNULL)
    return build_dir / "bin"


# What a build of the tools needs (no docs, models, tests, examples, web UI, other GPU backends).
SUBSET = ["CMakeLists.txt", "LICENSE", "cmake", "common", "include", "src", "vendor", "ggml/CMakeLists.txt",
          "ggml/cmake", "ggml/include", "ggml/src/ggml-cpu", "ggml/src/ggml-cuda", "tools/CMakeLists.txt",
          *[f"tools/{t}" for t in ("batched-bench", "gguf-split", "imatrix", "llama-bench", "completion", "perplexity",
                                   "quantize", "tokenize", "tts", "mtmd", "cvector-generator", "export-lora",
                                   "fit-params", "results")]]


def subset(dest: Path) -> Path:
    """The source folders a CUDA build of the tools needs, copied to `dest` (for a GPU machine
    without network access)."""
    import shutil
    src = source_dir()
    for rel in SUBSET:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, dest / rel, dirs_exist_ok=True)
        else:
            shutil.copy2(src / rel, dest / rel)
    for f in (src / "ggml" / "src").iterdir():  # the core's own files, not the other backends
        if f.is_file():
            shutil.copy2(f, dest / "ggml" / "src" / f.name)
    return dest


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(bin_dir() or build())
    elif sys.argv[1:] == ["build-server"]:
        print(server_bin() or build(server=True) / SERVER_TARGET)
    elif sys.argv[1:] == ["source"]:
        print(source_dir())
    elif len(sys.argv) == 3 and sys.argv[1] == "subset":
        print(subset(Path(sys.argv[2])))
    else:
        sys.exit("usage: python tests/llama_cpp.py build|build-server|source|subset DEST")
