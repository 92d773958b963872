"""The command line: generate, chat (driven through a pseudo-terminal), and the default model."""

import os
import subprocess
import sys
import time

import pexpect
import pytest

import fixtures


def sepedge(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "sepedge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def model():
    return str(fixtures.smollm2_gguf())


def test_generate(model):
    done = sepedge("generate", model, "-p", "The capital of France is", "-n", "4", "--temperature", "0", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" Paris")
    assert "tokens/s" in done.stderr and "generated" in done.stderr


def test_generate_rejects_bad_sampling(model):
    done = sepedge("generate", model, "-p", "hi", "--top-p", "1.5")
    assert done.returncode != 0 and "top_p must be in (0, 1]" in done.stderr
    done = sepedge("generate", model, "-p", "hi", "--temperature", "-2")
    assert done.returncode != 0 and "temperature" in done.stderr
    done = sepedge("generate", "/nonexistent.gguf", "-p", "hi")
    assert done.returncode != 0 and "cannot open" in done.stderr


def test_chat_one_turn_with_default_model(tmp_path):
    env = dict(os.environ, SEPEDGE_CACHE=str(tmp_path))
    done = sepedge("chat", "-p", "Name the capital city of France.", "--temperature", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert "Using the embedded default model SmolLM2-135M-Instruct" in done.stderr
    assert "Paris" in done.stdout and "tokens/s" in done.stderr


def test_chat_repl_in_a_terminal(model):
    child = pexpect.spawn(sys.executable, ["-m", "sepedge.cli", "chat", model, "--temperature", "0", "-c", "1024"],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("Ctrl-D exits")
        child.expect("> ")
        child.sendline("Name the capital city of France.")
        child.expect("Paris")
        child.expect("tokens/s")
        child.expect("> ")
        # a long reply, stopped with Ctrl-C: the program stays, the prompt comes back
        child.sendline("Write a very long story about a dragon who learns to paint, in ten chapters.")
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        time.sleep(0.5)
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/stats")
        child.expect(r"sepllm-stream cache: \d+ of 800 cells live")
        child.expect("> ")
        child.sendline("/reset")
        child.expect(r"\[conversation cleared\]")
        child.expect("> ")
        child.sendintr()  # Ctrl-C at the prompt only clears the line
        child.expect("> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_perplexity(model, tmp_path):
    import json

    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 40)
    done = sepedge("perplexity", model, str(text), "--kv-mode", "sepllm-stream", "--n-cache", "96", "--n-sep", "16",
                   "--n-local", "48", "--json", "--chunk", "100")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["kv_mode"] == "sepllm-stream" and r["capacity"] == 96 and r["avg_attended"] <= 96
    assert 1 < r["perplexity"] < 50 and r["tokens"] > 500
    from sepedge import Engine
    from sepedge.perplexity import perplexity
    with Engine(model, kv_mode="sepllm-stream", n_cache=96, n_sep=16, n_local=48) as llm:
        direct = perplexity(llm, llm.tokenize(text.read_text()), chunk=37)  # other chunking, same stream
    assert abs(direct["perplexity"] - r["perplexity"]) < 1e-3 * r["perplexity"]
    # the sliding variants by the same names on the command line; their window slides every token
    done = sepedge("perplexity", model, str(text), "--kv-mode", "sepllm-slide", "--n-cache", "96", "--n-sep", "16",
                   "--n-local", "76", "--json")
    assert done.returncode == 0, done.stderr
    slide = json.loads(done.stdout)
    # every cell in use once the cache has filled: more attended on average than sepllm-stream's cache
    assert slide["kv_mode"] == "sepllm-slide" and slide["capacity"] == 96
    assert r["avg_attended"] < slide["avg_attended"] <= 96
    done = sepedge("perplexity", model, str(text), "--kv-mode", "sepllm-runs", "--n-cache", "96", "--n-sep", "16",
                   "--n-local", "77", "--json")
    assert done.returncode != 0 and "n_init + n_sep + n_local <= n_cache" in done.stderr
    done = sepedge("perplexity", model, str(text), "-c", "128")
    assert done.returncode != 0 and "exceed the context window of 128" in done.stderr
    done = sepedge("perplexity", model, str(text), "-c", "128", "-n", "100")
    assert done.returncode == 0 and "perplexity" in done.stdout and "full cache" in done.stdout


def test_bench(model):
    import json
    done = sepedge("bench", model, "-p", "32", "-n", "8", "-r", "2", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["test"] for r in rows] == ["pp32", "tg8"] and all(r["tokens_per_second"] > 0 for r in rows)
    assert all(len(r["runs"]) == 2 for r in rows)
    done = sepedge("bench", model, "-p", "16", "-n", "4", "-r", "1", "--kv-mode", "sepllm-stream", "--n-cache", "96",
                   "--n-sep", "16", "--n-local", "48", "-d", "300")
    assert done.returncode == 0, done.stderr
    assert "pp16@d300" in done.stdout and "tg4@d300" in done.stdout and "sepllm-stream (96)" in done.stdout


def test_kv_modes_are_the_libraries():
    from sepedge import cli
    from sepedge._native import KV_MODES
    assert sorted(cli.KV_MODES) == sorted(KV_MODES)
