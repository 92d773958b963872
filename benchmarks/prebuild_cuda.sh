#!/bin/bash
# Build the CUDA library on this machine for one architecture (default 90) so that a GPU session call
# need not: benchmarks/cuda_session.sh uses build/cudaARCH/libsepedge.so when the hash stored next to
# it matches the current sources. Carry the library compressed (3.9 MB instead of 13.9: room for
# llama-bench in the same call) and its hash:  run(carry=["build/cuda90/libsepedge.so.xz",
# "build/cuda90/libsepedge.so.src-hash", ...]); the session scripts unpack it (--unpack).
#
#     bash benchmarks/prebuild_cuda.sh [ARCH]     # build; writes the library, its .xz and its .src-hash
#     bash benchmarks/prebuild_cuda.sh --hash     # print the hash of the sources (CMakeLists.txt, native/)
#     bash benchmarks/prebuild_cuda.sh --unpack [ARCH]  # the library from its .xz where only that came
set -eu
cd "$(dirname "$0")/.."
src_hash() { find CMakeLists.txt native -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }
if [ "${1:-}" = "--hash" ]; then src_hash; exit 0; fi
if [ "${1:-}" = "--unpack" ]; then
    lib=build/cuda${2:-90}/libsepedge.so
    [ -e "$lib" ] || [ ! -e "$lib.xz" ] || xz -dc "$lib.xz" > "$lib"
    exit 0
fi
ARCH=${1:-90}
h=$(src_hash)
cmake -S . -B "build/cuda$ARCH" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > /dev/null
cmake --build "build/cuda$ARCH" -j "${JOBS:-2}"
[ "$(src_hash)" = "$h" ] || { echo "the sources changed during the build: run it again" >&2; exit 1; }
xz -T0 -c "build/cuda$ARCH/libsepedge.so" > "build/cuda$ARCH/libsepedge.so.xz"
echo "$h" > "build/cuda$ARCH/libsepedge.so.src-hash"
ls -la "build/cuda$ARCH/libsepedge.so" "build/cuda$ARCH/libsepedge.so.xz"
