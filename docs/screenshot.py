"""Make docs/chat-page.png: the chat page of `sepedge serve` after a conversation longer than a small
SepLLM cache, in headless chromium (Debian's, through Playwright).

    python docs/screenshot.py [MODEL.gguf]   # default: the embedded model
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

OUT = Path(__file__).with_name("chat-page.png")
CACHE = ["--kv-mode", "sepllm-stream", "--n-init", "4", "--n-sep", "16", "--n-local", "64", "--n-cache", "128"]
TURNS = ["What is a KV cache, in two sentences?",
         "Give me a short Python function that reverses a string.",
         "Now explain, in a few sentences, why keeping only some tokens saves memory."]


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sepedge.cli", "serve", *sys.argv[1:2], "--port", str(port), "--parallel", "1",
           "--log-level", "warning", *CACHE]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.set_default_timeout(300_000)
            page.goto(url + "/")
            page.fill("#system", "You are a concise assistant.")
            page.fill("#temperature", "0.3")
            page.fill("#max_tokens", "120")
            page.fill("#extra", '{"seed": 1}')
            for i, text in enumerate(TURNS, 1):
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {i}"
                                       " && document.getElementById('stop').hidden")
            time.sleep(1)  # the last refresh of the cache view
            page.screenshot(path=str(OUT))
            browser.close()
    finally:
        server.terminate()
        server.wait()
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
