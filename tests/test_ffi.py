"""The cffi declarations come from sepedge.h; these tests fail when the header, the declarations
cffi derives from it, and the compiled library drift apart."""

import importlib.util
import re
import shutil

import pytest
from cffi import FFI

import fixtures
from sepedge import _ffi
from sepedge._ffi import ffi, lib

HEADER = fixtures.ROOT / "native" / "include" / "sepedge.h"


def declared_functions(text: str) -> set[str]:
    return set(re.findall(r"SE_API\s+[^;]*?\b(se_\w+)\s*\(", text, flags=re.S))


def test_installed_header_is_the_source_header():
    assert _ffi.header_path().read_text() == HEADER.read_text()


def test_every_declared_function_is_exported():
    names = declared_functions(HEADER.read_text())
    assert len(names) >= 30
    for name in sorted(names):
        assert getattr(lib, name) is not None, name  # cffi raises AttributeError for a missing symbol


def test_cdef_keeps_every_declaration():
    cdef = _ffi.cdef_from_header(HEADER.read_text())
    assert "#" not in cdef and "SE_API" not in cdef and 'extern "C"' not in cdef
    assert declared_functions(HEADER.read_text()) == set(re.findall(r"\b(se_\w+)\s*\(", cdef)) - {"se_status"}


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_struct_layouts_match_the_compiler(tmp_path):
    """cffi's reading of the header (used in ABI mode) against what a C compiler makes of it."""
    checked = FFI()
    checked.cdef(_ffi.cdef_from_header(HEADER.read_text()))
    libdir = str(_ffi.library_path().parent)
    checked.set_source("_sepedge_layout_check", '#include "sepedge.h"', include_dirs=[str(HEADER.parent)],
                       libraries=["sepedge"], library_dirs=[libdir], runtime_library_dirs=[libdir])
    so = checked.compile(tmpdir=str(tmp_path))  # a field cffi declares with the wrong type does not compile
    spec = importlib.util.spec_from_file_location("_sepedge_layout_check", so)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)  # API mode: sizes and offsets come from the compiler
    for struct in ("se_model_params", "se_model_info", "se_context_params", "se_cache_info", "se_sampler_params",
                   "se_cache_policy_params", "se_cache_plan"):
        assert ffi.sizeof(struct) == compiled.ffi.sizeof(struct), struct
        for field, _ in ffi.typeof(struct).fields:
            assert ffi.offsetof(struct, field) == compiled.ffi.offsetof(struct, field), (struct, field)
    for name in ("SE_ERR_CONTEXT_FULL", "SE_KV_F16", "SE_META_ARRAY", "SE_DEVICE_CUDA", "SE_REGION_RECENT"):
        assert getattr(lib, name) == getattr(compiled.lib, name), name


def test_status_names_and_version():
    assert ffi.string(lib.se_status_name(lib.SE_ERR_CONTEXT_FULL)) == b"SE_ERR_CONTEXT_FULL"
    assert ffi.string(lib.se_version()).decode() == __import__("sepedge").__version__
