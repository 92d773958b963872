"""The `sepedge` command line: parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import json
import sys

import click

from . import sepllm
from .errors import SepedgeError


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


def _default_model_path() -> str:
    from . import default_model
    click.echo(f"Using the embedded default model {default_model.NAME} "
               f"(from the {default_model.PACKAGE} package, converted once into {default_model.cache_dir()})",
               err=True)
    return str(default_model.default_model())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sepedge")
def main() -> None:
    """sepedge: quantized LLM inference with SepLLM's separator-compressed KV cache."""


@main.command()
@click.argument("src")
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output GGUF path [default: ./<name>-<OUTTYPE>.gguf].")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "auto"]),
              help="Tensor type for the weights [default: f16; a GGUF source keeps its types].")
@click.option("--separators", help='Separator set override, a JSON list of token texts and ids: \'[".", ",", "\\n", 198]\'.')
@click.option("--n-init", type=int, default=sepllm.DEFAULTS["n_init"], show_default=True, help="SepLLM initial tokens.")
@click.option("--n-sep", type=int, default=sepllm.DEFAULTS["n_sep"], show_default=True, help="SepLLM separator cells (0 = unlimited).")
@click.option("--n-local", type=int, default=sepllm.DEFAULTS["n_local"], show_default=True, help="SepLLM local window.")
@click.option("--n-cache", type=int, default=sepllm.DEFAULTS["n_cache"], show_default=True, help="SepLLM cache capacity in cells.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src, out, outtype, separators, n_init, n_sep, n_local, n_cache, revision, quiet):
    """Convert a Hugging Face checkpoint (local directory or hub repo id) to GGUF.

    SRC may also be a GGUF file: it is copied with fresh SepLLM metadata, tensors untouched.
    """
    from .convert import convert as run
    from .vocab import parse_separator_option
    try:
        spec = parse_separator_option(separators) if separators else None
        path = run(src, out, outtype=outtype, separators=spec, n_init=n_init, n_sep=n_sep, n_local=n_local,
                   n_cache=n_cache, revision=revision, progress=not quiet)
    except (SepedgeError, ValueError) as e:
        _fail(e)
    click.echo(str(path))


@main.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(file, as_json):
    """Describe a GGUF file: architecture, sizes, tensor types, separator set.

    Without FILE, describes the embedded default model.
    """
    from .info import format_summary, summary
    try:
        s = summary(file or _default_model_path())
    except SepedgeError as e:
        _fail(e)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))


if __name__ == "__main__":
    sys.exit(main())
