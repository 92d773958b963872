#!/usr/bin/env bash
# Line coverage of the C core reached by a fuzz corpus: the harness rebuilt with clang's source
# coverage (no sanitizers), every corpus file replayed once, then llvm-cov's per-file table.
#   native/fuzz/coverage.sh HARNESS CORPUS_DIR...      (e.g. fuzz_gguf build/fuzz/corpus/fuzz_gguf)
set -euo pipefail
cd "$(dirname "$0")/../.."
h=$1
shift
out=build/fuzz-cov
mkdir -p "$out"
srcs=(native/src/se-api.c native/src/se-error.c native/src/se-forward.c native/src/se-gguf.c
      native/src/se-kv-cache.c native/src/se-model.c native/src/se-sampler.c native/src/se-threads.c
      native/src/se-cache-plan.c native/src/se-repack.c native/src/se-quants-avx512.c)
sed 's/&& __builtin_cpu_supports("f16c")//' native/src/se-quants.c > "$out/se-quants.c"  # as build.sh
flags=(-g -O1 -std=gnu11 -fprofile-instr-generate -fcoverage-mapping -DSE_BUILD -Inative/include -Inative/src)
clang "${flags[@]}" -mavx2 -mfma -mf16c -c native/src/se-quants-avx2.c -o "$out/se-quants-avx2.o"
clang "${flags[@]}" -fsanitize=fuzzer "native/fuzz/$h.c" "${srcs[@]}" "$out/se-quants.c" "$out/se-quants-avx2.o" \
    -lm -lpthread -o "$out/$h"
rm -f "$out"/*.profraw
LLVM_PROFILE_FILE="$out/$h.profraw" "$out/$h" -runs=0 "$@" >/dev/null 2>&1
llvm-profdata merge -sparse "$out/$h.profraw" -o "$out/$h.profdata"
llvm-cov report "$out/$h" -instr-profile="$out/$h.profdata" "${srcs[@]}" "$out/se-quants.c"
