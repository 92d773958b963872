"""The `sepedge` command line: parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import json
import os
import signal
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
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "auto"]),
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


def sampling_options(f):
    """The sampling flags, named as the Engine's arguments; defaults follow llama.cpp."""
    from .engine import DEFAULTS
    for opt in reversed([
        click.option("-n", "--max-tokens", type=int, default=None, help="Tokens to generate (default: until the end of the reply / 256)."),
        click.option("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy."),
        click.option("--top-k", type=int, default=DEFAULTS["top_k"], show_default=True),
        click.option("--top-p", type=float, default=DEFAULTS["top_p"], show_default=True),
        click.option("--min-p", type=float, default=DEFAULTS["min_p"], show_default=True),
        click.option("--repeat-penalty", type=float, default=DEFAULTS["repeat_penalty"], show_default=True),
        click.option("--seed", type=int, default=None, help="Seed of the sampling random stream."),
        click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads [default: one per core]."),
    ]):
        f = opt(f)
    return f


KV_MODES = ["full", "sepllm", "sepllm-stream", "streamingllm", "sepllm-slide", "sepllm-runs"]  # sepedge._native.KV_MODES, without loading the library (tests check they agree)


def cache_options(default_mode: str):
    """The KV cache and device flags, named as the Engine's arguments."""
    def wrap(f):
        for opt in reversed([
            click.option("--kv-mode", type=click.Choice(KV_MODES), default=default_mode, show_default=True,
                         help="Which tokens the KV cache keeps."),
            click.option("-c", "--n-ctx", type=int, default=0, show_default=True,
                         help="full mode: KV cache cells; 0 = the model's context."),
            click.option("--n-init", type=int, default=None, help="Initial tokens kept [default: the model's sepllm.n_init]."),
            click.option("--n-sep", type=int, default=None, help="Separators kept, 0 = all [default: sepllm.n_sep]."),
            click.option("--n-local", type=int, default=None, help="Window of recent tokens [default: sepllm.n_local]."),
            click.option("--n-cache", type=int, default=None, help="Cells of a sparse cache [default: sepllm.n_cache]."),
            click.option("--device", type=click.Choice(["cpu", "cuda", "triton"]), default="cpu", show_default=True,
                         help="Where the weights and the KV cache live (triton: torch's GPU, Triton kernels)."),
        ]):
            f = opt(f)
        return f
    return wrap


def _engine(model, n_threads, cache: dict):
    from .engine import Engine
    try:
        return Engine(model or _default_model_path(), n_threads=n_threads, **cache)
    except SepedgeError as e:
        _fail(e)



def _stats(g) -> str:
    return (f"[{len(g.prompt_tokens)} prompt tokens in {g.prompt_seconds:.2f} s, {len(g.tokens)} generated at "
            f"{g.tokens_per_second:.1f} tokens/s, {g.finish_reason}]")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@sampling_options
@cache_options("full")
def generate(model, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, n_threads, **cache):
    """Continue PROMPT with MODEL (a GGUF file; default: the embedded model), streaming to stdout."""
    from .engine import DEFAULTS
    llm = None
    try:
        llm = _engine(model, n_threads, cache)
        g = llm.generate(prompt, 256 if max_tokens is None else max_tokens, stream=True, seed=seed,
                         temperature=DEFAULTS["temperature"] if temperature is None else temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
        for chunk in g:
            click.echo(chunk, nl=False)
        click.echo()
        click.echo(_stats(g), err=True)
    except KeyboardInterrupt:  # loading, or within a layer of the prompt or a token
        click.echo()
        sys.exit(130)
    except SepedgeError as e:
        _fail(e)
    finally:
        if llm is not None:
            llm.close()


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-s", "--system", help="System prompt.")
@click.option("-p", "--prompt", help="Send this one message, print the reply, and exit.")
@sampling_options
@cache_options("sepllm-stream")
def chat(model, system, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, n_threads, **cache):
    """Chat with MODEL (a GGUF file; default: the embedded model) using its chat template.

    The default cache, sepllm-stream, has a fixed size and never runs out: old turns are compressed
    into their separators, the system prompt is always kept. Commands: /reset clears the
    conversation, /stats shows the KV cache, /exit quits. Ctrl-C stops the current reply, Ctrl-D exits.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops replies even if the shell ignored it
    llm = _engine(model, n_threads, cache)
    sampling = dict(temperature=0.2 if temperature is None else temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty)
    history = [{"role": "system", "content": system}] if system else []
    first_seed = seed
    try:
        if prompt is not None:
            _reply(llm, history, prompt, max_tokens, sampling, first_seed)
            return
        click.echo(f"sepedge chat: {os.path.basename(llm.model_path)}, {llm.kv_mode} cache of {llm.n_ctx} cells. "
                   "/reset clears the conversation, /stats shows the cache, /exit quits; Ctrl-C stops a reply, "
                   "Ctrl-D exits.", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo()
                continue
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/stats":
                click.echo(_format_stats(llm.kv_stats()), err=True)
                continue
            if cmd == "/reset":
                history = [{"role": "system", "content": system}] if system else []
                llm.reset()
                click.echo("[conversation cleared]", err=True)
                continue
            if not cmd:
                continue
            _reply(llm, history, line, max_tokens, sampling, first_seed)
            first_seed = None if seed is None else first_seed + 1
    finally:
        llm.close()


def _format_stats(s: dict) -> str:
    return (f"[{s['mode']} cache: {s['live']} of {s['capacity']} cells live (initial {s['live_init']}, separators "
            f"{s['live_sep']}, recent {s['live_recent']}); {s['tokens_seen']} tokens seen, {s['tokens_evicted']} evicted; "
            f"{s['kv_bytes'] / 2 ** 20:.1f} MiB of K/V; sizes n_init {s['n_init']}, n_sep {s['n_sep']}, "
            f"n_local {s['n_local']}]")


def _reply(llm, history: list, text: str, max_tokens, sampling: dict, seed) -> None:
    """Stream the assistant's answer to `text`; Ctrl-C stops it, keeping what was said."""
    history.append({"role": "user", "content": text})
    g = None
    try:
        g = llm.stream_chat(history, max_tokens, seed=seed, **sampling)
        for chunk in g:
            click.echo(chunk, nl=False)
    except KeyboardInterrupt:  # within a layer of the native call (the engine cancels it)
        click.echo(" [stopped]", nl=False)
        if g is None or not g.tokens:  # stopped while reading the message: it was never answered
            history.pop()
            click.echo()
            return
    except SepedgeError as e:
        history.pop()
        click.echo(f"\nerror: {e}", err=True)
        return
    click.echo()
    if g is not None:
        history.append({"role": "assistant", "content": g.text})
        if g.finish_reason:
            click.echo(_stats(g), err=True)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--n-prompt", type=int, default=512, show_default=True, help="Prompt tokens (pp test; 0 = skip).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Generated tokens (tg test; 0 = skip).")
@click.option("-d", "--depth", type=int, default=0, show_default=True, help="Tokens of history before each test.")
@click.option("-r", "--repetitions", type=int, default=5, show_default=True)
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads [default: one per core].")
@cache_options("full")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def bench(model, n_prompt, n_gen, depth, repetitions, n_threads, as_json, **cache):
    """Prompt processing (pp) and generation (tg) speed of MODEL, as llama-bench measures them."""
    from .bench import bench as run
    from .bench import format_table
    if cache["kv_mode"] == "full" and not cache["n_ctx"]:
        cache["n_ctx"] = depth + max(n_prompt, n_gen, 1) + 16
    llm = _engine(model, n_threads, cache)
    try:
        rows = run(llm, n_prompt, n_gen, depth, repetitions)
        click.echo(json.dumps(rows, indent=2) if as_json else format_table(llm, rows, n_threads))
    except SepedgeError as e:
        _fail(e)
    finally:
        llm.close()


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("textfile", type=click.Path(exists=True, dir_okay=False))
@cache_options("full")
@click.option("-n", "--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@click.option("--chunk", type=int, default=512, show_default=True, help="Tokens fed per call.")
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads [default: one per core].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def perplexity(model, textfile, max_tokens, chunk, n_threads, as_json, **cache):
    """Streaming perplexity of TEXTFILE under MODEL, with the KV cache as --kv-mode keeps it."""
    from tqdm import tqdm

    from .perplexity import perplexity as run
    llm = _engine(model, n_threads, cache)
    try:
        with open(textfile, encoding="utf-8", errors="replace") as f:
            tokens = llm.tokenize(f.read())
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        with tqdm(total=len(tokens), unit="tok", disable=as_json, leave=False) as bar:
            r = run(llm, tokens, chunk=chunk, progress=bar.update)
    except (SepedgeError, ValueError) as e:
        _fail(e)
    finally:
        llm.close()
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens; {r['kv_mode']} cache, "
                   f"{r['avg_attended']:.1f} cells attended on average (capacity {r['capacity']}); "
                   f"{r['tokens_per_second']:.1f} tokens/s")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only by default).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("-np", "--parallel", type=int, default=4, show_default=True,
              help="Slots: conversations served at once, each with its own KV cache.")
@click.option("--api-key", envvar="SEPEDGE_API_KEY", help="Require 'Authorization: Bearer KEY' [env: SEPEDGE_API_KEY].")
@click.option("-a", "--alias", "model_name", help="Model name in the API [default: the file name without .gguf].")
@click.option("-n", "--n-predict", type=int, default=1024, show_default=True,
              help="Tokens to generate when a request sets no max_tokens.")
@click.option("-t", "--threads", "n_threads", type=int, default=None,
              help="CPU threads per slot [default: the cores divided among the slots].")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@cache_options("sepllm-stream")
def serve(model, host, port, parallel, api_key, model_name, n_predict, n_threads, log_level, **cache):
    """Serve MODEL (a GGUF file; default: the embedded model) over an OpenAI-compatible HTTP API.

    Open http://HOST:PORT/ in a browser for a chat page that shows what each slot's cache holds.
    Endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, /slots,
    /slots/ID/cache, /metrics. Each of the --parallel slots keeps its own cache; with the default sepllm-stream cache
    each costs a fixed n_cache cells however long its conversations run.
    """
    try:
        from .server import serve as run
    except ImportError as e:
        _fail(RuntimeError(f"the server needs FastAPI, uvicorn and sse-starlette: pip install 'sepedge[server]' ({e})"))
    if parallel < 1:
        _fail(ValueError(f"--parallel must be >= 1, got {parallel}"))
    path = model or _default_model_path()
    try:
        run(path, host=host, port=port, parallel=parallel, api_key=api_key, model_name=model_name,
            n_predict=n_predict, n_threads=n_threads, log_level=log_level, **cache)
    except SepedgeError as e:
        _fail(e)


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m"], case_sensitive=False))
@click.option("--allow-requantize", is_flag=True, help="Accept a source whose weights are quantized already.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src, out, outtype, allow_requantize, quiet):
    """Write the GGUF file SRC to OUT with its weights in OUTTYPE (as llama-quantize).

    Types per tensor follow `sepedge convert` (norms stay f32, the output head gets Q6_K under the
    4-bit types, q4_k_m keeps some attn_v/ffn_down at Q6_K). Metadata is copied.
    """
    from .convert import requantize
    try:
        path = requantize(src, out, outtype.lower(), allow_requantize=allow_requantize, progress=not quiet)
    except (SepedgeError, ValueError) as e:
        _fail(e)
    click.echo(str(path))


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", help="Text to tokenize [default: standard input].")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@click.option("--no-parse-special", is_flag=True, help="Tokenize special-token text (e.g. <|im_start|>) as plain text.")
@click.option("--ids", "ids_only", is_flag=True, help="Print only the ids, as a list.")
@click.option("--show-count", is_flag=True, help="Print the number of tokens at the end.")
def tokenize(model, prompt, no_bos, no_parse_special, ids_only, show_count):
    """Token ids of a text under MODEL's tokenizer (as llama-tokenize): one `id -> 'piece'` per line."""
    from ._native import Model
    from .tokenizer import Tokenizer
    text = prompt if prompt is not None else sys.stdin.read()
    try:
        with Model(model or _default_model_path()) as m:
            tok = Tokenizer.from_model(m)
        ids = tok.encode(text, add_bos=False if no_bos else None, special=not no_parse_special)
    except SepedgeError as e:
        _fail(e)
    if ids_only:
        click.echo(json.dumps(ids))
    else:
        for i in ids:
            click.echo(f"{i:6d} -> {tok.decode([i], special=True).decode('utf-8', 'replace')!r}")
    if show_count:
        click.echo(f"Total number of tokens: {len(ids)}")


if __name__ == "__main__":
    sys.exit(main())
