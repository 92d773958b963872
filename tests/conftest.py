import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402
import llama_cpp  # noqa: E402
from sepedge import Engine  # noqa: E402
from sepedge.convert import convert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Factory: the HF directory of a tiny checkpoint spec (built once per session)."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = fixtures.make_tiny_checkpoint(fixtures.SPEC_BY_NAME[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def gguf_path(tiny_dirs, tmp_path_factory):
    """Factory: a tiny checkpoint spec converted to an outtype (once per session)."""
    out, done = tmp_path_factory.mktemp("tiny-gguf"), {}

    def get(spec: str, outtype: str) -> Path:
        if (spec, outtype) not in done:
            done[spec, outtype] = convert(tiny_dirs(spec), out / f"{spec}-{outtype}.gguf", outtype=outtype, progress=False)
        return done[spec, outtype]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    return fixtures.smollm2_hf_dir()


@pytest.fixture(scope="session")
def llama_cpp_bin():
    """llama.cpp's tools; skipped when not built, unless CI requires them (SEPEDGE_REQUIRE_LLAMA_CPP=1)."""
    d = llama_cpp.bin_dir()
    if d is None:
        if os.environ.get("SEPEDGE_REQUIRE_LLAMA_CPP"):
            pytest.fail("llama.cpp is not built: run `python tests/llama_cpp.py build`")
        pytest.skip("llama.cpp is not built (python tests/llama_cpp.py build)")
    return d


@pytest.fixture(scope="module")
def eog(tiny_model):
    """logit_bias that keeps the tiny random model (each server test module's `tiny_model`) from ending
    its replies."""
    with Engine(tiny_model, n_ctx=8) as e:
        return {str(t): -100 for t in e.tokenizer.eog_ids}
