#!/bin/bash
# Build the CUDA library on this machine for one architecture (default 90) so that a GPU session call
# need not: benchmarks/cuda_session.sh uses build/cudaARCH/libsepedge.so when the hash stored next to
# it matches the current sources. Carry both files:  run(carry=["build/cuda90/libsepedge.so",
# "build/cuda90/libsepedge.so.src-hash", ...]).
#
#     bash benchmarks/prebuild_cuda.sh [ARCH]     # build; writes the library and its .src-hash
#     bash benchmarks/prebuild_cuda.sh --hash     # print the hash of the sources (CMakeLists.txt, native/)
set -eu
cd "$(dirname "$0")/.."
src_hash() { find CMakeLists.txt native -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }
if [ "${1:-}" = "--hash" ]; then src_hash; exit 0; fi
ARCH=${1:-90}
h=$(src_hash)
cmake -S . -B "build/cuda$ARCH" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > /dev/null
cmake --build "build/cuda$ARCH" -j "${JOBS:-2}"
[ "$(src_hash)" = "$h" ] || { echo "the sources changed during the build: run it again" >&2; exit 1; }
echo "$h" > "build/cuda$ARCH/libsepedge.so.src-hash"
ls -la "build/cuda$ARCH/libsepedge.so"
