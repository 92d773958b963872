#!/bin/bash
# One session on a GPU machine that has CUDA, cmake and a python3 with torch but no network: the
# python packages it lacks come as wheels in .whl/, llama.cpp's sources and the vocabularies in
# .gpu/ (prepared on a machine with network access:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf cffi pycparser
#     python tests/llama_cpp.py subset /tmp/s && tar cJf .gpu/llama-src.tar.xz -C /tmp/s llama.cpp
#     python tests/fixtures.py smollm2-vocab .gpu/smollm2-vocab.gguf
#     cp <llama.cpp>/models/ggml-vocab-llama-bpe.gguf .gpu/ )
#
#     bash benchmarks/cuda_session.sh tests bench ...   (phases, in order; logs and results in $OUT)
#
# Phases: tests (pytest -m gpu), llama (build llama.cpp with CUDA, in the background), models
# (random-weight GGUFs), bench (benchmarks/cuda_bench.py), bench8b / benchsmol (one model each),
# save-llama (the built llama-bench, compressed, to $OUT) / use-llama (take it from .gpu/ instead of
# building), quick (sepedge bench alone), copybw (device-to-device copy rate through torch: the
# ceiling of the decode kernels), profile8b (per-kernel GPU times of decode and of a 512-token
# prefill, and prompt times, on the 8B files).
set -u
OUT=${OUT:-/tmp/sepedge-out}
mkdir -p "$OUT" /tmp/models
export PYTHONUNBUFFERED=1
ARCH=${CUDA_ARCH:-90}
JOBS=$(nproc)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
ln -sfn ../convert sepedge/convert  # where the wheel puts it
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$ARCH > "$OUT/build.log" 2>&1 &&
    cmake --build build-gpu -j "$JOBS" >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export SEPEDGE_LIB=$PWD/build-gpu/libsepedge.so
export SEPEDGE_SMOLLM2_VOCAB=$PWD/.gpu/smollm2-vocab.gguf

llama_build() {
    rm -rf /tmp/llama.cpp /tmp/llama-build
    tar xJf .gpu/llama-src.tar.xz -C /tmp
    cmake -S /tmp/llama.cpp -B /tmp/llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_CCACHE=OFF &&
    cmake --build /tmp/llama-build -j "$JOBS" --target llama-bench
}

wait_llama() {
    local waited=0
    while [ ! -e /tmp/llama-done ] && [ $waited -lt ${LLAMA_WAIT:-100000} ]; do sleep 2; waited=$((waited + 2)); done
    ls -la /tmp/llama-build/bin/llama-bench || { tail -30 "$OUT/llama-build.log"; return 1; }
}

models() {  # which: 8b, smol or both
    local all="llama3-8b:q4_0:ggml-vocab-llama-bpe llama3-8b:q4_k_m:ggml-vocab-llama-bpe smollm2-135m:q4_0:smollm2-vocab"
    for m in $all; do
        IFS=: read shape type vocab <<< "$m"
        case "${1:-both}:$shape" in 8b:smollm2*|smol:llama3*) continue ;; esac
        [ -n "${ONLY_MODELS:-}" ] && [[ " $ONLY_MODELS " != *" $shape-$type "* ]] && continue
        [ -e /tmp/models/$shape-$type.gguf ] ||
            python3 benchmarks/random_gguf.py $shape $type --vocab .gpu/$vocab.gguf -o /tmp/models/$shape-$type.gguf
    done
}

for phase in "$@"; do
    echo "=== $phase $(date +%T)"
    case $phase in
        llama) (setsid bash -c "$(declare -f llama_build); JOBS=$JOBS ARCH=$ARCH llama_build > $OUT/llama-build.log 2>&1; touch /tmp/llama-done" &) ;;
        tests) SEPEDGE_CUDA_REPORT=$OUT/errors.tsv timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -m gpu tests/test_cuda.py \
                   --maxfail=25 -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
        models) models ;;
        save-llama) wait_llama && strip /tmp/llama-build/bin/llama-bench && xz -T0 -c /tmp/llama-build/bin/llama-bench | split -b 15M - "$OUT/llama-bench.xz." &&
                    ls -la "$OUT"/llama-bench.xz.* && ldd /tmp/llama-build/bin/llama-bench | grep -iE "cuda|cublas" ;;
        use-llama) mkdir -p /tmp/llama-build/bin && cat .gpu/llama-bench.xz.* | xz -dc > /tmp/llama-build/bin/llama-bench &&
                   chmod +x /tmp/llama-build/bin/llama-bench && touch /tmp/llama-done ;;
        bench) models && wait_llama && python3 benchmarks/cuda_bench.py --llama-bench /tmp/llama-build/bin/llama-bench \
                   /tmp/models/*.gguf --out "$OUT/cuda_bench.json" ;;
        bench8b) models 8b && wait_llama && python3 benchmarks/cuda_bench.py --llama-bench /tmp/llama-build/bin/llama-bench \
                   /tmp/models/llama3-8b-q4_0.gguf /tmp/models/llama3-8b-q4_k_m.gguf --out "$OUT/cuda_bench_8b.json" ${BENCH_ARGS:-} ;;
        benchsmol) models smol && wait_llama && python3 benchmarks/cuda_bench.py --llama-bench /tmp/llama-build/bin/llama-bench \
                   /tmp/models/smollm2-135m-q4_0.gguf --out "$OUT/cuda_bench_smol.json" ${BENCH_ARGS_SMOL:-} ;;
        profile) models ${PROFILE_MODELS:-smol}
                 for m in /tmp/models/*.gguf; do
                     [ -n "${ONLY_MODELS:-}" ] && [[ " $ONLY_MODELS " != *" $(basename $m .gguf) "* ]] && continue
                     python3 benchmarks/cuda_profile.py $m
                     SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --steps 16
                     for mode in full sepllm-stream; do
                         python3 benchmarks/cuda_profile.py $m --depth ${PROFILE_DEPTH:-32768} --kv-mode $mode
                         SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth ${PROFILE_DEPTH:-32768} --kv-mode $mode --steps 8
                     done
                 done 2>&1 | tee $OUT/profile.log ;;
        quick) models && for m in /tmp/models/*.gguf; do python3 -m sepedge.cli bench $m --device cuda -p 512 -n 128 -r 3; done ;;
        quick8b) models 8b && for m in /tmp/models/llama3-8b-*.gguf; do
                     python3 -m sepedge.cli bench $m --device cuda -p 4096 -n 128 -r 2
                 done 2>&1 | tee $OUT/quick.log ;;
        copybw) python3 - <<'PY' 2>&1 | tee $OUT/copybw.log
import torch
n = 2 << 30  # 2 GiB read + 2 GiB written a copy
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
ts = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
    ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
print(f"device-to-device copy: {2 * n / ts[len(ts) // 2] / 1e12:.2f} TB/s (bytes read + written, median of 20, 2 GiB)")
PY
                ;;
        profile8b) models 8b
                 for m in /tmp/models/llama3-8b-*.gguf; do
                     SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --steps 16
                     SEPEDGE_CUDA_TIMING=prefill python3 benchmarks/cuda_profile.py $m --prompt 512
                 done 2>&1 | tee $OUT/profile.log ;;
        *) echo "unknown phase $phase"; exit 2 ;;
    esac
done
echo "=== done $(date +%T)"
