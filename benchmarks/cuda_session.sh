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
# Phases: tests (pytest -m gpu; TEST_K: a -k expression), llama (build llama.cpp with CUDA, in the background), models
# (random-weight GGUFs), bench (benchmarks/cuda_bench.py), bench8b / benchsmol (one model each),
# save-llama (the built llama-bench, compressed, to $OUT) / use-llama (take it from .gpu/ instead of
# building), quick (sepedge bench alone), copybw (device-to-device copy rate through torch: the
# ceiling of the decode kernels), decode-ab / depth-ab (decode with chained launches and L2 prefetch
# on and off; at 32K history), bench8b-depth (the 32K row), ttft (4096-token prompts through Engine), profile8b (per-kernel GPU times of decode and of a 512-token
# prefill, and prompt times, on the 8B files), ncu-mmq (hardware counters of one layer's int8 prefill products),
# models-bg / models-wait (make the models in the background, wait for them), pick-cvt (A/B of the int8
# prefill's integer-to-float conversion; the faster stays set for the later phases), mv-ab (decode with the row-team
# products against the warp-per-row ones, SEPEDGE_CUDA_MV), next-ab (decode with the attention's idle blocks asking L2
# for the next products' weights: SEPEDGE_CUDA_NEXT_L2 MB), ring-ab (decode attention at 32K history, full and
# sepllm-stream: the cache cell- or head-major, keys and values through registers or the cp.async ring,
# SEPEDGE_CUDA_KV_LAYOUT / _ATTN_RING / _ATTN_STAGES), stream-ab (sepllm-stream after 32K: cells a split takes, interleaved; the
# attention's kernel times; ncu of one attention launch after 32K and at 0 history), cublas (the cuBLAS prefill route: where cuBLAS comes from, its tests, then benchmarks/cublas_ab.py
# on both 8B files, route on / off interleaved, 64..4096-token prompts, and the route's per-kernel prefill times),
# tc-ab (the decode attention on the tensor cores, SEPEDGE_CUDA_ATTN_TC: its tests with the graphs / kv-mode ones,
# then 8B Q4_0 decode at 32K history, full cache (0 / 1 / 2 / 0) and sepllm-stream (deltas: the float kernel
# either way), and at 0 history, and the kernels' times at 32K; ~250 s with the prebuilt library and the models made),
# tcd-ab (the tensor-core decode attention in the modes whose cells carry deltas: its tests with the kv-mode ones, then
# 8B Q4_0 sepllm-stream decode with SEPEDGE_CUDA_ATTN_TC=0 (the float kernel) against unset (auto: the tensor-core
# kernel turning keys by their deltas), interleaved, after 32K tokens of random history (439 of the 128K ids are
# separators: the separator region is full, 68 cells with deltas of ~800) and at 0 history; auto with 13 and 6
# splits (TCD_SPLITS; the default one wave makes 25 of 32 cells); the attention's kernel times in timing mode at
# 32K and at 0; ~250 s with the prebuilt library and the models made).
# merge-ab (the decode attention's merge of its splits, SEPEDGE_CUDA_ATTN_MERGE 0 / 1 / 2: its GPU tests, then sepllm-stream
# after 32K and at 0 history interleaved, 64 / 128 cells a split with the merge on, timing mode, ncu of one launch; ~300 s),
# ncu-mv (hardware counters and stall reasons of one layer's decode products, 8B Q4_0 and Q4_K_M), smol-ab (SmolLM2's
# decode with the float or the tensor-core attention, SEPEDGE_CUDA_ATTN_TC 0 / 2, then its kernel times).
# pick (benchmarks/env_ab.py: SEPEDGE_CUDA_MV_SPEC and SEPEDGE_CUDA_ATTN_SPLIT_CELLS measured, the fastest of each
# appended to $CHOICE for later phases to source), q4k-ab (Q4_K in the split layout, SEPEDGE_CUDA_Q4K_REPACK=1: its GPU
# tests, 8B Q4_K_M decode against the file's layout interleaved, then the kernels' times in timing mode; ~200 s with
# the prebuilt library, plus the Q4_K_M file's making on a fresh machine).
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
# A library built here beforehand for this architecture (benchmarks/prebuild_cuda.sh, carried as
# build/cuda$ARCH/libsepedge.so and its .src-hash) saves the minute or more of device time a build takes;
# it serves only if it was built from these very sources.
PRE=build/cuda$ARCH/libsepedge.so
bash benchmarks/prebuild_cuda.sh --unpack $ARCH  # carried compressed
if [ -e "$PRE" ] && [ "$(cat "$PRE.src-hash" 2>/dev/null)" = "$(bash benchmarks/prebuild_cuda.sh --hash)" ]; then
    echo "using the prebuilt $PRE" | tee "$OUT/build.log"
    export SEPEDGE_LIB=$PWD/$PRE
else
    cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$ARCH > "$OUT/build.log" 2>&1 &&
        cmake --build build-gpu -j "$JOBS" >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    export SEPEDGE_LIB=$PWD/build-gpu/libsepedge.so
fi
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
                   --maxfail=25 -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
        models) models ;;
        cublas) python3 -c "import os; from sepedge._ffi import ffi, lib; r = lib.se_cuda_cublas_load(); print('SEPEDGE_CUBLAS:',
                    os.environ.get('SEPEDGE_CUBLAS'), '| load:', ffi.string(lib.se_last_error()).decode() if r else 'ok')" 2>&1 | tee $OUT/cublas.log
                SEPEDGE_CUDA_REPORT=$OUT/errors-cublas.tsv timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_cuda.py \
                    -k "cublas or dequantize_f16" --maxfail=10 -p no:cacheprovider 2>&1 | tee -a $OUT/cublas.log | tail -15
                models 8b
                python3 benchmarks/cublas_ab.py /tmp/models/llama3-8b-q4_0.gguf /tmp/models/llama3-8b-q4_k_m.gguf \
                    --out $OUT/cublas_ab.json 2>&1 | tee -a $OUT/cublas.log
                for m in /tmp/models/llama3-8b-*.gguf; do
                    SEPEDGE_CUDA_TIMING=prefill python3 benchmarks/cuda_profile.py $m --prompt 512 2>&1 | sed "s/^/cublas=1 /"
                done 2>&1 | tee -a $OUT/cublas.log ;;
        models-bg) (models > $OUT/models.log 2>&1; touch /tmp/models-done) & ;;  # make the models while the tests run
        models-wait) while [ ! -e /tmp/models-done ]; do sleep 2; done; cat $OUT/models.log ;;
        pick-cvt) models 8b  # the int8 prefill's integer-to-float conversion (SEPEDGE_CUDA_MMQ_CVT): the faster, for the phases after
                 total() { for m in /tmp/models/llama3-8b-*.gguf; do python3 benchmarks/cuda_profile.py $m --prompt 512 2>&1; done |
                           tee -a $OUT/pick-cvt.log | awk '/prompt 512/ {t += $(NF-3)} END {print t}'; }
                 t_magic=$(SEPEDGE_CUDA_MMQ_CVT=magic bash -c "$(declare -f total); OUT=$OUT total")
                 t_i2f=$(env -u SEPEDGE_CUDA_MMQ_CVT bash -c "$(declare -f total); OUT=$OUT total")
                 echo "512-token prompts, both 8B files, ms: magic $t_magic, i2f $t_i2f" | tee -a $OUT/pick-cvt.log
                 if python3 -c "import sys; sys.exit(0 if float('$t_magic') < float('$t_i2f') else 1)"; then
                     export SEPEDGE_CUDA_MMQ_CVT=magic; else unset SEPEDGE_CUDA_MMQ_CVT; fi
                 echo "SEPEDGE_CUDA_MMQ_CVT=${SEPEDGE_CUDA_MMQ_CVT:-i2f} from here on" | tee -a $OUT/pick-cvt.log ;;
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
        decode-ab) models  # decode ms/token: chained launches (PDL) off, then on with each L2 prefetch level
                 for m in /tmp/models/*.gguf; do
                     for v in "0 1" "1 0" "1 1" "1 2"; do
                         read pdl pf <<< "$v"
                         SEPEDGE_CUDA_PDL=$pdl SEPEDGE_CUDA_PREFETCH=$pf python3 benchmarks/cuda_profile.py $m --steps 64 2>&1 |
                             sed "s/^/pdl=$pdl prefetch=$pf /"
                     done
                 done 2>&1 | tee $OUT/decode-ab.log ;;
        mv-ab) models  # decode ms/token: the row-team decode products where they measured faster (auto), everywhere
                 # (teams; teams-l4: Q4_0 with 4 loads a thread) and nowhere (rows: the warp-per-row kernel); kernel times
                 mv_env() { case $1 in rows) echo SEPEDGE_CUDA_MV=rows ;; teams) echo SEPEDGE_CUDA_MV=teams ;;
                                      teams-l4) echo SEPEDGE_CUDA_MV=teams SEPEDGE_CUDA_MVT_LOADS=4 ;; *) echo SEPEDGE_CUDA_MV=auto ;; esac; }
                 for m in /tmp/models/*.gguf; do
                     for k in ${MV_VARIANTS:-rows auto teams teams-l4}; do
                         env $(mv_env $k) python3 benchmarks/cuda_profile.py $m --steps 64 2>&1 | sed "s/^/mv=$k /"
                     done
                     for k in ${MV_TIMED:-auto}; do
                         env $(mv_env $k) SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --steps 16 2>&1 | grep -v "^ *embeddings\|rope_tables" | sed "s/^/mv=$k /"
                     done
                 done 2>&1 | tee $OUT/mv-ab.log ;;
        depth-ab) models 8b  # full cache after 32K tokens, 8B Q4_0: prefetch levels, split counts, then kernel times
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 for v in "0 0" "1 0" "2 0" "1 128" "1 24"; do
                     read pf sp <<< "$v"
                     SEPEDGE_CUDA_PREFETCH=$pf SEPEDGE_CUDA_ATTN_SPLITS=$sp python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 32 2>&1 |
                         sed "s/^/prefetch=$pf splits=$sp /"
                 done 2>&1 | tee $OUT/depth-ab.log
                 SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 8 2>&1 | tee -a $OUT/depth-ab.log ;;
        bench8b-depth) models 8b && wait_llama && python3 benchmarks/cuda_bench.py --llama-bench /tmp/llama-build/bin/llama-bench \
                   /tmp/models/llama3-8b-q4_0.gguf --out "$OUT/cuda_bench_depth.json" --tests tg128@d32768 --reps 1 ;;
        ttft) models 8b  # time to first token: a 4096-token prompt through Engine, full cache and sepllm-stream
                 for m in /tmp/models/llama3-8b-*.gguf; do
                     for mode in full sepllm-stream; do python3 benchmarks/cuda_profile.py $m --prompt 4096 --kv-mode $mode; done
                 done 2>&1 | tee $OUT/ttft.log ;;
        ncu) models 8b  # hardware counters: one decode attention launch after 32K tokens, one layer's decode products
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 sections="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats"
                 SEPEDGE_CUDA_GRAPHS=0 timeout 150 ncu --clock-control none -k regex:k_attn_decode --launch-skip 40 --launch-count 1 \
                     $sections python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 4 > $OUT/ncu.log 2>&1
                 SEPEDGE_CUDA_GRAPHS=0 timeout 100 ncu --clock-control none -k regex:k_matvec --launch-skip 133 --launch-count 4 \
                     $sections python3 benchmarks/cuda_profile.py $m --steps 4 >> $OUT/ncu.log 2>&1
                 grep -E "k_attn|k_matvec|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Grid Size|Block Limit|Warp Cycles Per Issued|Issued Warp" $OUT/ncu.log ;;
        ncu-mv) models 8b  # hardware counters of one layer's decode products (rows / teams kernels), 8B Q4_0 and Q4_K_M:
                 # DRAM throughput, occupancy, and the stall reasons a warp spends its cycles on (why they sit at 22-57% of copy)
                 sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis"
                 stalls="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
                 for m in /tmp/models/llama3-8b-q4_0.gguf /tmp/models/llama3-8b-q4_k_m.gguf; do
                     SEPEDGE_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k "regex:k_matvec|k_mvt" \
                         --launch-skip ${NCU_SKIP:-300} --launch-count ${NCU_COUNT:-5} $sections --metrics "$stalls" \
                         python3 benchmarks/cuda_profile.py $m --steps 6 > $OUT/ncu-mv-$(basename $m .gguf).log 2>&1
                     grep -E "^  (void )?k_|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Grid Size|Block Size|Warp Cycles Per Issued|Issued Warp|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|stalled_(long|lg|mio|short|wait|barrier|not_sel|math|no_inst|drain|membar|selected|imc|branch|dispatch|tex)" \
                         $OUT/ncu-mv-$(basename $m .gguf).log | sed 's/  */ /g' | head -${NCU_LINES:-150}
                 done ;;
        pick) models  # decode switches chosen by measurement (benchmarks/env_ab.py, interleaved rounds): the fastest value of
              # each is appended to $CHOICE (default /tmp/choice.env; a later phase or call sources it)
              CHOICE=${CHOICE:-/tmp/choice.env}
              m0=/tmp/models/llama3-8b-q4_0.gguf mk=/tmp/models/llama3-8b-q4_k_m.gguf ms=/tmp/models/smollm2-135m-q4_0.gguf
              python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_MV_SPEC --values 0,1 --rounds ${PICK_ROUNDS:-2} --choose $CHOICE \
                  --case "$m0 --steps 64" --case "$mk --steps 64" --md $OUT/pick.md 2>&1 | tail -12
              python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_ATTN_SPLIT_CELLS --values ${SPLIT_VALUES:-32,64,128,256} \
                  --rounds ${PICK_ROUNDS:-2} --choose $CHOICE --case "$m0 --depth 32768 --kv-mode sepllm-stream --steps 48" \
                  --case "$m0 --steps 128" --case "$ms --steps 128" --md $OUT/pick.md 2>&1 | tail -12
              cat $CHOICE ;;
        smol-ab) models smol  # SmolLM2-135M (head_dim 64) decode: the float attention against the tensor-core one (=2), interleaved,
                 # then each kernel's GPU time a token in timing mode
                 m=/tmp/models/smollm2-135m-q4_0.gguf
                 { for tc in 0 2 0 2; do
                       SEPEDGE_CUDA_ATTN_TC=$tc python3 benchmarks/cuda_profile.py $m --steps 128 2>&1 | sed "s/^/tc=$tc /"
                   done
                   SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --steps 32 2>&1; } | tee $OUT/smol-ab.log ;;
        ncu-mmq) models 8b  # hardware counters of the int8 prefill products: a layer's launches (QKV, wo, gate/up, down), 8B Q4_0 and Q4_K_M
                 sections="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis"
                 for m in /tmp/models/llama3-8b-q4_0.gguf /tmp/models/llama3-8b-q4_k_m.gguf; do
                     echo "## $m"
                     timeout ${NCU_TIMEOUT:-100} ncu --clock-control none -k regex:k_mmq --launch-skip 10 --launch-count 5 $sections \
                         python3 benchmarks/cuda_profile.py $m --prompt 512
                 done > $OUT/ncu-mmq.log 2>&1
                 grep -E "^## |k_mmq|Duration|Registers Per|Achieved Occupancy|Theoretical Occ|Issued Warp|Issue Slots Busy|Warp Cycles Per Issued|Compute \(SM\) Throughput|Memory Throughput|Grid Size|Dynamic Shared|Block Limit|stall|Stall" $OUT/ncu-mmq.log | head -150 ;;
        profile8b) models 8b
                 for m in /tmp/models/llama3-8b-*.gguf; do
                     SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --steps 16
                     SEPEDGE_CUDA_TIMING=prefill python3 benchmarks/cuda_profile.py $m --prompt 512
                 done 2>&1 | tee $OUT/profile.log ;;
        next-ab) models  # decode ms/token with the next products' weights asked of L2 by the attention's idle blocks (SEPEDGE_CUDA_NEXT_L2 MB)
                 for m in /tmp/models/*.gguf; do
                     [ -n "${ONLY_MODELS:-}" ] && [[ " $ONLY_MODELS " != *" $(basename $m .gguf) "* ]] && continue
                     for mb in ${NEXT_MB:-0 24 40 0 24}; do
                         SEPEDGE_CUDA_NEXT_L2=$mb python3 benchmarks/cuda_profile.py $m --steps 64 2>&1 | sed "s/^/next_l2=$mb /"
                     done
                 done 2>&1 | tee $OUT/next-ab.log ;;
        ring-ab) models 8b  # decode attention after 32K tokens, 8B Q4_0: the cache cell- or head-major (SEPEDGE_CUDA_KV_LAYOUT),
                 # keys and values through registers (ring 0) or the cp.async ring (SEPEDGE_CUDA_ATTN_RING, _STAGES), full cache
                 # and sepllm-stream; the combination with the least time (full + stream) stays set for the later phases; its kernel times
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 for v in ${RING_COMBOS:-"cells 0" "heads 0" "heads 1"}; do
                     read lay ring <<< "$v"
                     for mode in full sepllm-stream; do
                         SEPEDGE_CUDA_KV_LAYOUT=$lay SEPEDGE_CUDA_ATTN_RING=$ring python3 benchmarks/cuda_profile.py $m --depth 32768 \
                             --kv-mode $mode --steps 48 2>&1 | sed "s/^/layout=$lay ring=$ring /"
                     done
                 done 2>&1 | tee $OUT/ring-ab.log
                 best=$(awk '/ms\/token/ {for (i = 1; i <= NF; i++) if ($i == "ms/token,") t[$1 " " $2] += $(i - 1)}
                             END {for (k in t) print t[k], k}' $OUT/ring-ab.log | sort -n | head -1)
                 echo "least full + stream ms/token: $best" | tee -a $OUT/ring-ab.log
                 read _ lay ring <<< "$best"
                 export SEPEDGE_CUDA_KV_LAYOUT=${lay#layout=} SEPEDGE_CUDA_ATTN_RING=${ring#ring=}
                 echo "SEPEDGE_CUDA_KV_LAYOUT=$SEPEDGE_CUDA_KV_LAYOUT SEPEDGE_CUDA_ATTN_RING=$SEPEDGE_CUDA_ATTN_RING from here on" | tee -a $OUT/ring-ab.log
                 { python3 benchmarks/cuda_profile.py $m --kv-mode sepllm-stream --steps 64
                   SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 8
                   SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth 32768 --kv-mode sepllm-stream --steps 16; } 2>&1 |
                     grep -v "^ *embeddings" | tee -a $OUT/ring-ab.log ;;
        tc-ab) models 8b  # SEPEDGE_CUDA_ATTN_TC: 0 the float decode attention, 1 / 2 the tensor-core one (3 / 4 blocks a multiprocessor)
                 SEPEDGE_CUDA_REPORT=$OUT/errors-tc.tsv timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/test_cuda.py \
                     -k "${TC_TESTS:-attention_tc or kv_modes_tc or graphs_and_decode}" --maxfail=10 -p no:cacheprovider 2>&1 |
                     tee $OUT/tc-ab.log | tail -15
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 { for tc in ${TC_ORDER:-0 1 2 0}; do
                       SEPEDGE_CUDA_ATTN_TC=$tc python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 48 2>&1 | sed "s/^/tc=$tc /"
                   done
                   for tc in 0 1; do
                       SEPEDGE_CUDA_ATTN_TC=$tc python3 benchmarks/cuda_profile.py $m --depth 32768 --kv-mode sepllm-stream --steps 48 2>&1 |
                           sed "s/^/tc=$tc /"
                       SEPEDGE_CUDA_ATTN_TC=$tc python3 benchmarks/cuda_profile.py $m --steps 64 2>&1 | sed "s/^/tc=$tc /"
                   done
                   for tc in ${TC_TIMED:-0 1}; do
                       SEPEDGE_CUDA_ATTN_TC=$tc SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth 32768 --steps 8 2>&1 |
                           grep -E "attention|ms/token|GPU time per pass" | sed "s/^/tc=$tc /"
                   done; } 2>&1 | tee -a $OUT/tc-ab.log ;;
        tcd-ab) models 8b  # SEPEDGE_CUDA_ATTN_TC=0 (the float decode attention) against unset (auto: the tensor-core one) in sepllm-stream
                 SEPEDGE_CUDA_REPORT=$OUT/errors-tcd.tsv timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_cuda.py \
                     -k "${TCD_TESTS:-(kv_modes_match_cpu and d128) or kv_modes_tc or stream_long_tc}" --maxfail=10 \
                     -p no:cacheprovider 2>&1 | tee $OUT/tcd-ab.log | tail -15
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 tc_env() { if [ "$1" = auto ]; then echo "-u SEPEDGE_CUDA_ATTN_TC"; else echo "SEPEDGE_CUDA_ATTN_TC=$1"; fi; }
                 { for tc in ${TCD_ORDER:-0 auto 0 auto}; do
                       env $(tc_env $tc) python3 benchmarks/cuda_profile.py $m --depth 32768 --kv-mode sepllm-stream --steps 48 2>&1 |
                           sed "s/^/tc=$tc /"
                   done
                   for tc in 0 auto; do
                       env $(tc_env $tc) python3 benchmarks/cuda_profile.py $m --kv-mode sepllm-stream --steps 64 2>&1 | sed "s/^/tc=$tc /"
                   done
                   for sp in ${TCD_SPLITS-13 6}; do  # fewer splits of the ~800 cells (13: a block's 4 warps x 16 cells): what 25 merges cost
                       env -u SEPEDGE_CUDA_ATTN_TC SEPEDGE_CUDA_ATTN_SPLITS=$sp python3 benchmarks/cuda_profile.py $m --depth 32768 \
                           --kv-mode sepllm-stream --steps 48 2>&1 |
                           sed "s/^/tc=auto splits=$sp /"
                   done
                   for tc in 0 auto; do
                       for d in 32768 0; do
                           env $(tc_env $tc) SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth $d --kv-mode sepllm-stream \
                               --steps 16 2>&1 | grep -E "attention|ms/token|GPU time per pass" | sed "s/^/tc=$tc depth=$d /"
                       done
                   done; } 2>&1 | tee -a $OUT/tcd-ab.log ;;
        q4k-ab) ONLY_MODELS=${ONLY_MODELS:-llama3-8b-q4_k_m} models 8b  # Q4_K uploaded in the split layout (SEPEDGE_CUDA_Q4K_REPACK=1) against
                # the file's superblocks: its GPU tests, then 8B Q4_K_M decode interleaved (benchmarks/env_ab.py), then
                # each kernel's GPU time a token in timing mode, both layouts
                SEPEDGE_CUDA_REPORT=$OUT/errors-q4k.tsv timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_cuda.py \
                    -k "${Q4K_TESTS:-q4_K_split or q4_K_file or (decode_kernels and Q4_K) or graphs_and_decode_paths}" --maxfail=10 \
                    -p no:cacheprovider 2>&1 | tee $OUT/q4k-ab.log | tail -15
                mk=/tmp/models/llama3-8b-q4_k_m.gguf
                # the 8B file's logits from both layouts (the tests' models fit one upload batch and 2 superblocks a
                # row; here the upload's 64 MB batches and the real shapes): rounding apart, else MISMATCH
                python3 - $mk cuda <<'PY' 2>&1 | tee -a $OUT/q4k-ab.log
import os, sys, numpy as np
from sepedge import Engine
toks, out = list(range(100, 116)), {}
for v in ("0", "1"):
    os.environ["SEPEDGE_CUDA_Q4K_REPACK"] = v
    with Engine(sys.argv[1], device=sys.argv[2], kv_type="f16", n_ctx=64, n_batch=16) as llm:
        out[v] = np.stack([llm.eval(toks[:8])] + [llm.eval([t]) for t in toks[8:]])
d = float(np.abs(out["1"] - out["0"]).max() / np.abs(out["0"]).max())
print(f"{os.path.basename(sys.argv[1])} logits (prompt 8, 8 steps), split layout against the file's: "
      f"max |diff| / max |logit| = {d:.2e}{'  MISMATCH' if not d <= 0.1 else ''}")
PY
                python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_Q4K_REPACK --values 0,1 --rounds ${Q4K_ROUNDS:-2} \
                    --case "$mk --steps 64" --md $OUT/q4k-ab.md 2>&1 | tail -12 | tee -a $OUT/q4k-ab.log
                for v in 0 1; do
                    SEPEDGE_CUDA_Q4K_REPACK=$v SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $mk --steps 16 2>&1 |
                        grep -E "norm|qkv|wo|gate_up|down|output|attention|ms/token|GPU time per pass" | sed "s/^/repack=$v /"
                done 2>&1 | tee -a $OUT/q4k-ab.log ;;
        stream-ab) ONLY_MODELS=${ONLY_MODELS:-llama3-8b-q4_0} models 8b  # sepllm-stream after 32K tokens, 8B Q4_0 (~800 live cells):
                 # cells a split takes (SEPEDGE_CUDA_ATTN_SPLIT_CELLS: 128 makes 7 splits, 256 4, 512 2, 1024 1) interleaved,
                 # the attention's kernel times in timing mode at two of them, then the counters of one decode attention
                 # launch after 32K and at 0 history (stall reasons)
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_ATTN_SPLIT_CELLS --values ${STREAM_CELLS:-128,256,512,1024} \
                     --rounds ${STREAM_ROUNDS:-2} --case "$m --depth 32768 --kv-mode sepllm-stream --steps 48" \
                     --md $OUT/stream-ab.md 2>&1 | tail -12 | tee $OUT/stream-ab.log
                 for sc in ${STREAM_TIMED:-128 512}; do
                     SEPEDGE_CUDA_ATTN_SPLIT_CELLS=$sc SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth 32768 \
                         --kv-mode sepllm-stream --steps 16 2>&1 | grep -E "attention|rope|ms/token|GPU time per pass" | sed "s/^/cells=$sc /"
                 done 2>&1 | tee -a $OUT/stream-ab.log
                 for depth in 32768 0; do
                     SEPEDGE_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:k_attn_decode --launch-skip 40 \
                         --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
                         --section MemoryWorkloadAnalysis python3 benchmarks/cuda_profile.py $m --depth $depth --kv-mode sepllm-stream \
                         --steps 4 > $OUT/ncu-stream-$depth.log 2>&1
                     echo "## ncu, stream at depth $depth"
                     grep -E "k_attn|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Warp Cycles Per Issued|Issued Warp|Stall|stall|L2 Hit" \
                         $OUT/ncu-stream-$depth.log | head -40
                 done ;;
        merge-ab) ONLY_MODELS=${ONLY_MODELS:-llama3-8b-q4_0} models 8b  # the decode attention's merge of its splits
                 # (SEPEDGE_CUDA_ATTN_MERGE 0 / 1 / 2, cuda_kernels_log.md session 11b): its GPU tests (the same bits as 0),
                 # 8B Q4_0 sepllm-stream decode after 32K tokens and at 0 history interleaved, the split size again with
                 # the merge's loads in flight (64 cells: 13 splits, one step a warp), the attention's kernel times in
                 # timing mode, then ncu of one launch after 32K with the switch at 2 (~300 s with the prebuilt library)
                 SEPEDGE_CUDA_REPORT=$OUT/errors-merge.tsv timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_cuda.py \
                     -k "${MERGE_TESTS:-attn_merge}" --maxfail=3 -p no:cacheprovider 2>&1 | tee $OUT/merge-ab.log | tail -8
                 m=/tmp/models/llama3-8b-q4_0.gguf
                 python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_ATTN_MERGE --values ${MERGE_VALUES:-0,1,2} --rounds ${MERGE_ROUNDS:-2} \
                     --case "$m --depth 32768 --kv-mode sepllm-stream --steps 48" --case "$m --kv-mode sepllm-stream --steps 64" \
                     --md $OUT/merge-ab.md 2>&1 | tail -12 | tee -a $OUT/merge-ab.log
                 SEPEDGE_CUDA_ATTN_MERGE=${MERGE_ON:-2} python3 benchmarks/env_ab.py --var SEPEDGE_CUDA_ATTN_SPLIT_CELLS \
                     --values ${MERGE_CELLS:-128,64} --rounds 1 --case "$m --depth 32768 --kv-mode sepllm-stream --steps 48" \
                     --md $OUT/merge-cells.md 2>&1 | tail -8 | tee -a $OUT/merge-ab.log
                 for mg in 0 ${MERGE_ON:-2}; do
                     for d in 32768 0; do
                         SEPEDGE_CUDA_ATTN_MERGE=$mg SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py $m --depth $d \
                             --kv-mode sepllm-stream --steps 16 2>&1 | grep -E "attention|ms/token|GPU time per pass" | sed "s/^/merge=$mg depth=$d /"
                     done
                 done 2>&1 | tee -a $OUT/merge-ab.log
                 SEPEDGE_CUDA_ATTN_MERGE=${MERGE_ON:-2} SEPEDGE_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-150} ncu --clock-control none \
                     -k regex:k_attn_decode --launch-skip 40 --launch-count 1 --section SpeedOfLight --section Occupancy \
                     --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis python3 benchmarks/cuda_profile.py $m \
                     --depth 32768 --kv-mode sepllm-stream --steps 4 > $OUT/ncu-merge-32768.log 2>&1
                 echo "## ncu, stream at depth 32768, merge ${MERGE_ON:-2}" | tee -a $OUT/merge-ab.log
                 grep -E "k_attn|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Grid Size|Warp Cycles Per Issued|Stall|stall" \
                     $OUT/ncu-merge-32768.log | head -30 | tee -a $OUT/merge-ab.log ;;
        profile-stream) models 8b  # kernel times of sepllm-stream decode after 32K tokens, and its wall time
                 { SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py /tmp/models/llama3-8b-q4_0.gguf --depth 32768 --kv-mode sepllm-stream --steps 16
                   python3 benchmarks/cuda_profile.py /tmp/models/llama3-8b-q4_0.gguf --depth 32768 --kv-mode sepllm-stream --steps 64
                   python3 benchmarks/cuda_profile.py /tmp/models/llama3-8b-q4_0.gguf --kv-mode sepllm-stream --steps 64; } 2>&1 |
                     tee $OUT/profile-stream.log ;;
        profile-extra) models  # kernel times of decode after 32K tokens (8B Q4_0) and of SmolLM2's decode
                 { SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py /tmp/models/llama3-8b-q4_0.gguf --depth 32768 --steps 8
                   python3 benchmarks/cuda_profile.py /tmp/models/smollm2-135m-q4_0.gguf --steps 128
                   SEPEDGE_CUDA_TIMING=1 python3 benchmarks/cuda_profile.py /tmp/models/smollm2-135m-q4_0.gguf --steps 32; } 2>&1 |
                     tee $OUT/profile-extra.log ;;
        *) echo "unknown phase $phase"; exit 2 ;;
    esac
done
echo "=== done $(date +%T)"
