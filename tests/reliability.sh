#!/usr/bin/env bash
# Reliability stage of CI (issue I), after tests/run.sh has made .venv:
#   1. the native library built with AddressSanitizer + UndefinedBehaviorSanitizer (gcc), and the
#      tests that drive the C core hardest run against it (any report fails the run);
#   2. a fuzz smoke: each libFuzzer harness (clang, ASan + UBSan) for $SEPEDGE_FUZZ_SECONDS (45) s
#      from the seed models, plus the committed corpus.
# The long campaign is benchmarks/fuzz_campaign.sh; results in benchmarks/results/fuzz.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
b=build/sanitize
mkdir -p "$b"

# --- 1. sanitizer build and test run
# every portable C file of the core (se-quants-avx512.c too: its functions carry their own target
# attributes); the *-avx2.c files are compiled apart, for their instruction set
mapfile -t srcs < <(ls native/src/*.c | grep -v -- '-avx2\.c$')
san=(-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -fPIC -std=gnu11
     -DSE_BUILD -Inative/include -Inative/src)
gcc "${san[@]}" -mavx2 -mfma -mf16c -c native/src/se-quants-avx2.c -o "$b/se-quants-avx2.o"
gcc "${san[@]}" -shared "${srcs[@]}" "$b/se-quants-avx2.o" -lm -lpthread -o "$b/libsepedge.so"
# Python itself is not instrumented: the runtime is preloaded, leaks of the interpreter are not
# ours (detect_leaks=0), and torch's allocators pair new/delete across libraries.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export SEPEDGE_TIME_SCALE=10  # the deadlines of the cancellation tests, for a build several times slower
# the property tests at a third of their example counts (the plain run had them all); the CLI interrupt
# test is left to the plain run (it re-reads a 2000-token prompt, minutes in this build)
export SEPEDGE_FUZZ_EXAMPLES=0.3
SEPEDGE_LIB=$PWD/$b/libsepedge.so python -m pytest -q -p no:cacheprovider \
    tests/test_reliability.py tests/test_malformed_gguf.py tests/test_ffi.py tests/test_fuzz_properties.py -k "not cli"
unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS

# --- 2. fuzz smoke
if ! command -v clang >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq clang >/dev/null
    else
        echo "reliability: clang is needed for the fuzz smoke (apt-get install clang)" >&2
        exit 1
    fi
fi
f=build/fuzz-smoke
native/fuzz/build.sh "$f" >/dev/null
[ -f "$f/seeds/models.txt" ] || python native/fuzz/make_seeds.py "$f/seeds" >/dev/null
export SEPEDGE_FUZZ_MODELS=$(paste -sd: "$f/seeds/models.txt")
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
secs=${SEPEDGE_FUZZ_SECONDS:-45}
for h in fuzz_gguf fuzz_decode; do
    mkdir -p "$f/corpus/$h" "$f/findings/$h"
    seeds=native/fuzz/corpus/${h#fuzz_}
    extra=()
    [ "$h" = fuzz_gguf ] && extra+=("$f/seeds/gguf")
    [ -d "$seeds" ] && extra+=("$seeds")
    max_len=4096
    [ "$h" = fuzz_gguf ] && max_len=262144
    if ! "$f/$h" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len="$max_len" \
            -artifact_prefix="$f/findings/$h/" "$f/corpus/$h" "${extra[@]}" >"$f/$h.log" 2>&1; then
        tail -60 "$f/$h.log" >&2
        echo "reliability: $h found a crash (input in $f/findings/$h/)" >&2
        exit 1
    fi
    echo "fuzz smoke: $(grep -E '^#[0-9]+.*DONE' "$f/$h.log" | tail -1)"
done
