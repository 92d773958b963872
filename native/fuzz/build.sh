#!/usr/bin/env bash
# Build the libFuzzer harnesses against the C core, with AddressSanitizer and UndefinedBehaviorSanitizer.
#   native/fuzz/build.sh [OUT_DIR]        (default build/fuzz; needs clang with libFuzzer)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/fuzz}
mkdir -p "$out"
CC=${CC:-clang}
flags=(-g -O1 -std=gnu11 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -DSE_BUILD -Inative/include -Inative/src)
# every portable C file of the core but se-quants.c (patched below); *-avx2.c files apart
mapfile -t srcs < <(ls native/src/*.c | grep -v -- '-avx2\.c$' | grep -v 'se-quants\.c$')
# clang before 15 does not know the "f16c" name of __builtin_cpu_supports; every x86 CPU with AVX2
# and FMA has F16C, so the fuzz build checks those two only (a copy, the source is untouched)
sed 's/&& __builtin_cpu_supports("f16c")//' native/src/se-quants.c > "$out/se-quants.c"
srcs+=("$out/se-quants.c")
# the AVX2 kernels in their own object, compiled for their instruction set as in CMakeLists.txt
"$CC" "${flags[@]/-fsanitize=fuzzer,address,undefined/-fsanitize=fuzzer-no-link,address,undefined}" \
    -mavx2 -mfma -mf16c -c native/src/se-quants-avx2.c -o "$out/se-quants-avx2.o"
for h in fuzz_gguf fuzz_decode; do
    [ -f "native/fuzz/$h.c" ] || continue
    "$CC" "${flags[@]}" "native/fuzz/$h.c" "${srcs[@]}" "$out/se-quants-avx2.o" -lm -lpthread -o "$out/$h"
done
echo "built: $(ls "$out" | grep -v '\.o$' | tr '\n' ' ')"
