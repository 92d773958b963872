#!/bin/bash
# The Triton backend on a GPU machine (CUDA, cmake, python3 with torch and triton, no network), in
# short calls to a machine that stays warm between them: everything built or written goes to /tmp
# and is reused by the next call. Wheels in .whl/, vocabularies (and llama-bench) in .gpu/ as for
# benchmarks/cuda_session.sh; the real SmolLM2 file arrives in two parts (one call carries at most
# 64 MiB): part A under .trid-a/smol.part* in one call (phase stash), part B in the next (phase smol).
# DEADLINE (seconds from the start of the script, default 280) bounds the long phases; TEST_K selects tests.
#
#     bash benchmarks/triton_session.sh setup tests stash ...   (phases in order; logs in $OUT)
#
# Phases: setup (wheels; the library without CUDA built at once under /tmp, with CUDA in the
# background), stash (copy .trid*/smol.part* to /tmp), smol (join the parts, greedy text against
# the CPU engine), tests / kerneltests (pytest of the Triton backend / kernels, compiled on the GPU),
# gputests (both files in one pytest over XDIST processes: pytest-xdist from .whl; compiling is
# what takes the time, and it runs on the CPU cores),
# models-bg / models (the random-weight 8B files: started in the background / waited for),
# bandwidth (decode products + copy rate), bench (benchmarks/triton_bench.py, DEVICES=triton,cuda),
# sweep (benchmarks/triton_prefill_sweep.py, SWEEP_ARGS: e.g. "--quick --types q4_k,q6_k --decoders 1,3" for
# the product rates of the Q4_K / Q6_K float16 tile decoders), profile (benchmarks/triton_profile.py per model,
# PROFILE_ARGS: e.g. "--pp 512,4096" for the A/B of the prefill routes q8 / f16 / dq at both lengths,
# "--routes f16,dq --timeline f16,dq" for where each route's wall time goes between its kernels,
# "--routes f16,dq --env SEPEDGE_TRITON_F16_DECODE --modes 1,3" for pp512 per tile decoder),
# ab (benchmarks/triton_ab.py per model: tg128 with AB_ENV (default SEPEDGE_TRITON_FUSE) set to each of AB_MODES
# (default 0,attn,1), interleaved; AB_CHOOSE: a file the fastest mode is appended to as ENV=mode),
# use-llama (the llama-bench of .gpu/), llamabench (its rows),
# tiles (benchmarks/triton_decode_tiles.py: the decode products' tile table of this GPU from both 8B models (TILES_MODELS),
# TILES_ARGS e.g. "--fuse 1" or "--extra 16,4,4"; written to $TILES, default /tmp/results/tiles-<gpu slug>.json,
# after each key, and merged: a later call's tiles goes on with the keys left out), tiles-ab
# (benchmarks/triton_tiles_ab.py per model of AB_MODELS (default both): tg128 with SEPEDGE_TRITON_TILES=$TILES
# against 0 (autotune), AB_PROCS (default 3) fresh processes an arm, interleaved, REPS (default 3) runs each).
set -u
OUT=${OUT:-/tmp/sepedge-out}
mkdir -p "$OUT" /tmp/models /tmp/smol /tmp/results  # results accumulate across calls in /tmp/results
export PYTHONUNBUFFERED=1
ARCH=${CUDA_ARCH:-90}
export PYTHONPATH=/tmp/site:$PWD
# the CPU-only library (built in seconds) serves tests and the SmolLM2 check; the CUDA one (built in the
# background by setup) the benchmark's CUDA rows
if [ -e /tmp/build-gpu/done ]; then export SEPEDGE_LIB=/tmp/build-gpu/libsepedge.so; else export SEPEDGE_LIB=/tmp/build-cpu/libsepedge.so; fi
export SEPEDGE_SMOLLM2_VOCAB=/tmp/vocab/smollm2-vocab.gguf
MODELS="/tmp/models/llama3-8b-q4_0.gguf /tmp/models/llama3-8b-q4_k_m.gguf"
ln -sfn ../convert sepedge/convert   # where the wheel puts them
ln -sfn ../kernels sepedge/kernels

setup() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
    [ -e /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
    mkdir -p /tmp/vocab && cp -n .gpu/*vocab*.gguf .trid*/*vocab*.gguf /tmp/vocab/ 2>/dev/null; ls /tmp/vocab
    # the C/CUDA sources may change between calls of one warm machine (another session edits native/):
    # rebuild both libraries when the hash of the sources differs from the one stored with the build
    local h; h=$(bash benchmarks/prebuild_cuda.sh --hash)
    if [ "$(cat /tmp/build-src.hash 2>/dev/null)" != "$h" ]; then
        echo "native sources $h (built: $(cat /tmp/build-src.hash 2>/dev/null || echo none)): rebuilding"
        rm -rf /tmp/build-cpu /tmp/build-gpu /tmp/build-gpu.failed
        echo "$h" > /tmp/build-src.hash
    fi
    if [ ! -e /tmp/build-cpu/libsepedge.so ]; then
        rm -rf /tmp/nsrc && mkdir -p /tmp/nsrc && cp -r CMakeLists.txt native /tmp/nsrc/
        local t0=$SECONDS
        cmake -S /tmp/nsrc -B /tmp/build-cpu -DCMAKE_BUILD_TYPE=Release -DSEPEDGE_CUDA=OFF > "$OUT/build-cpu.log" 2>&1 &&
            cmake --build /tmp/build-cpu -j "$(nproc)" >> "$OUT/build-cpu.log" 2>&1 || { tail -30 "$OUT/build-cpu.log"; return 1; }
        echo "CPU library built in $((SECONDS - t0)) s"
        local pre=build/cuda$ARCH/libsepedge.so  # benchmarks/prebuild_cuda.sh, carried: no build on the device
        bash benchmarks/prebuild_cuda.sh --unpack $ARCH
        if [ -e "$pre" ] && [ "$(cat "$pre.src-hash" 2>/dev/null)" = "$h" ]; then
            mkdir -p /tmp/build-gpu && cp "$pre" /tmp/build-gpu/ && echo "prebuilt $pre" > /tmp/build-gpu.log &&
                touch /tmp/build-gpu/done
        else  # in the background, its output away from this script's (a pipe reader would wait for it)
            (setsid bash -c "cmake -S /tmp/nsrc -B /tmp/build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$ARCH \
                > /tmp/build-gpu.log 2>&1 && cmake --build /tmp/build-gpu -j 8 >> /tmp/build-gpu.log 2>&1 && touch /tmp/build-gpu/done \
                || touch /tmp/build-gpu.failed" > /dev/null 2>&1 &)
        fi
    fi
}

wait_gpu_lib() {
    local t0=$SECONDS
    while [ ! -e /tmp/build-gpu/done ] && [ ! -e /tmp/build-gpu.failed ] && [ $((SECONDS - t0)) -lt 200 ]; do sleep 1; done
    tail -3 /tmp/build-gpu.log
    [ -e /tmp/build-gpu/done ] && export SEPEDGE_LIB=/tmp/build-gpu/libsepedge.so && echo "CUDA library ready"
}

gpu_slug() {  # kernels/tile_table.py's gpu_slug of the GPU's name: "NVIDIA H200" -> nvidia-h200
    nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g'
}

left() {  # seconds to DEADLINE, at least 5
    local l=$(( ${DEADLINE:-280} - SECONDS ))
    [ $l -lt 5 ] && l=5
    echo $l
}

make_models() {  # the two 8B files, in parallel; /tmp/models-done when both are written
    touch /tmp/models-started
    for t in q4_0 q4_k_m; do
        [ -e /tmp/models/llama3-8b-$t.gguf ] || python3 benchmarks/random_gguf.py llama3-8b $t \
            --vocab /tmp/vocab/ggml-vocab-llama-bpe.gguf -o /tmp/models/llama3-8b-$t.gguf.tmp &
    done
    wait
    for t in q4_0 q4_k_m; do [ -e /tmp/models/llama3-8b-$t.gguf.tmp ] && mv /tmp/models/llama3-8b-$t.gguf.tmp /tmp/models/llama3-8b-$t.gguf; done
    touch /tmp/models-done
}

for phase in "$@"; do
    echo "=== $phase $(date +%T)"
    case $phase in
        setup) setup || exit 1 ;;
        stash) cp .trid*/smol.part* /tmp/smol/ && ls -la /tmp/smol ;;
        smol) cp -n .trid*/smol.part* /tmp/smol/ 2>/dev/null
              cat /tmp/smol/smol.part* > /tmp/smol/smollm2.gguf && sha256sum /tmp/smol/smollm2.gguf | tee "$OUT/smol.sha256"
              timeout $(left) python3 benchmarks/triton_smollm2.py /tmp/smol/smollm2.gguf ${SMOL_ARGS:---f32} --json "$OUT/triton_smollm2.json" \
                  2>&1 | tee "$OUT/smol.log" | tail -12 ;;
        tests) timeout $(left) python3 -m pytest -q -p no:cacheprovider -rs ${TEST_K:+-k "$TEST_K"} \
                   tests/test_triton_backend.py 2>&1 | tee "$OUT/tests-backend.log" | tail -15 ;;
        kerneltests) timeout $(left) python3 -m pytest -q -p no:cacheprovider -rs ${TEST_K:+-k "$TEST_K"} \
                   tests/test_triton_kernels.py 2>&1 | tee "$OUT/tests-kernels.log" | tail -15 ;;
        gputests) timeout ${TEST_S:-$(left)} python3 -m pytest -q -p no:cacheprovider -rs -n ${XDIST:-12} --durations=10 \
                      ${TEST_K:+-k "$TEST_K"} tests/test_triton_kernels.py tests/test_triton_backend.py 2>&1 \
                      | tee "$OUT/tests-gpu.log" | tail -25 ;;
        models-bg) (setsid bash -c "$(declare -f make_models); make_models > $OUT/models.log 2>&1" &) ;;
        models) [ -e /tmp/models-started ] || make_models > "$OUT/models.log" 2>&1
                while [ ! -e /tmp/models-done ]; do sleep 1; done; ls -la /tmp/models ;;
        bandwidth) timeout $(left) python3 benchmarks/triton_bench.py --bandwidth --devices "" $MODELS --json /tmp/results/triton_bench.json \
                       --md /tmp/results/triton_bench.md 2>&1 | tail -20 ;;
        bench) wait_gpu_lib; timeout $(left) python3 benchmarks/triton_bench.py --devices ${DEVICES:-triton,cuda} --reps ${REPS:-3} ${BENCH_ARGS:-} $MODELS \
                   --json /tmp/results/triton_bench.json --md /tmp/results/triton_bench.md 2>&1 | tail -30 ;;
        sweep) timeout $(left) python3 benchmarks/triton_prefill_sweep.py ${SWEEP_ARGS:-} --json "$OUT/triton_prefill_sweep.json" 2>&1 | tail -12 ;;
        ab) for m in ${PROFILE_MODELS:-$MODELS}; do
                timeout $(left) python3 benchmarks/triton_ab.py "$m" --env ${AB_ENV:-SEPEDGE_TRITON_FUSE} \
                    --modes ${AB_MODES:-0,attn,1} --reps ${REPS:-5} --md "$OUT/ab-${AB_ENV:-fuse}-$(basename "$m" .gguf).md" \
                    ${AB_CHOOSE:+--choose $AB_CHOOSE} 2>&1 | tail -40
            done ;;
        profile) for m in ${PROFILE_MODELS:-$MODELS}; do
                     timeout $(left) python3 benchmarks/triton_profile.py "$m" ${PROFILE_ARGS:-} --md "$OUT/profile-$(basename "$m" .gguf).md" 2>&1 | tail -70
                 done ;;
        tiles) TILES=${TILES:-/tmp/results/tiles-$(gpu_slug).json}
               for m in ${TILES_MODELS:-/tmp/models/llama3-8b-q4_k_m.gguf /tmp/models/llama3-8b-q4_0.gguf}; do
                   timeout $(left) python3 benchmarks/triton_decode_tiles.py "$m" ${TILES_ARGS:-} --merge "$TILES" --out "$TILES" \
                       --deadline $(( $(left) - 20 )) 2>&1 | tee -a "$OUT/tiles.log" | tail -40
               done ;;
        tiles-ab) TILES=${TILES:-/tmp/results/tiles-$(gpu_slug).json}
                  for m in ${AB_MODELS:-/tmp/models/llama3-8b-q4_k_m.gguf /tmp/models/llama3-8b-q4_0.gguf}; do
                      timeout $(left) python3 benchmarks/triton_tiles_ab.py "$m" --table "$TILES" --procs ${AB_PROCS:-3} \
                          --reps ${REPS:-3} --md "$OUT/tiles-ab-$(basename "$m" .gguf).md" \
                          --json "$OUT/tiles-ab-$(basename "$m" .gguf).json" 2>&1 | tail -20
                  done ;;
        use-llama) mkdir -p /tmp/llama-build/bin && cat .gpu/llama-bench.xz.* | xz -dc > /tmp/llama-build/bin/llama-bench &&
                   chmod +x /tmp/llama-build/bin/llama-bench ;;
        llamabench) timeout $(left) python3 benchmarks/triton_bench.py --devices "" --llama-bench /tmp/llama-build/bin/llama-bench \
                        --reps ${REPS:-3} $MODELS --json /tmp/results/triton_bench.json --md /tmp/results/triton_bench.md 2>&1 | tail -20 ;;
        *) echo "unknown phase $phase"; exit 2 ;;
    esac
done
cp /tmp/results/* "$OUT/" 2>/dev/null
echo "=== done $(date +%T)"
