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
    done = sepedge("chat", "-p", "What is the capital of France?", "--temperature", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert "Using the embedded default model SmolLM2-135M-Instruct" in done.stderr
    assert "Paris" in done.stdout and "tokens/s" in done.stderr


def test_chat_repl_in_a_terminal(model):
    child = pexpect.spawn(sys.executable, ["-m", "sepedge.cli", "chat", model, "--temperature", "0", "-c", "1024"],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("Ctrl-D exits")
        child.expect("> ")
        child.sendline("What is the capital of France?")
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
