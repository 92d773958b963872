#!/usr/bin/env bash
# A fuzz campaign: each libFuzzer harness (ASan + UBSan) for SECONDS, one process at a time, niced.
#   benchmarks/fuzz_campaign.sh [SECONDS_PER_HARNESS] [HARNESS...]     (default 3600; fuzz_gguf fuzz_decode)
# Corpora grow in build/fuzz/corpus/<harness> and are reused by later runs; crashes go to
# build/fuzz/findings/<harness>/. Prints one summary row per harness (for benchmarks/results/fuzz.md).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3600}
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(fuzz_gguf fuzz_decode)
b=build/fuzz
for h in "${harnesses[@]}"; do [ -x "$b/$h" ] || native/fuzz/build.sh "$b" >/dev/null; done
[ -f "$b/seeds/models.txt" ] || python native/fuzz/make_seeds.py "$b/seeds" >/dev/null
export SEPEDGE_FUZZ_MODELS=$(paste -sd: "$b/seeds/models.txt")
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for h in "${harnesses[@]}"; do
    corpus=$b/corpus/$h findings=$b/findings/$h log=$b/logs/$h-$(date -u +%Y%m%dT%H%M%S).log
    mkdir -p "$corpus" "$findings" "$b/logs"
    seeds=()
    [ "$h" = fuzz_gguf ] && seeds=("$b/seeds/gguf" native/fuzz/corpus/gguf)
    [ "$h" = fuzz_decode ] && seeds=(native/fuzz/corpus/decode)
    existing=()
    for s in "${seeds[@]}"; do [ -d "$s" ] && existing+=("$s"); done
    max_len=4096
    [ "$h" = fuzz_gguf ] && max_len=262144
    start=$(date +%s)
    set +e
    nice -n 10 "$b/$h" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len="$max_len" \
        -print_final_stats=1 -artifact_prefix="$findings/" "$corpus" "${existing[@]}" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$(( $(date +%s) - start ))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
    n_corpus=$(ls "$corpus" | wc -l)
    n_find=$(ls "$findings" | wc -l)
    echo "| $h | $(date -u +%F) | ${elapsed} s | ${runs:-?} | ${cov:-?} | ${ft:-?} | $n_corpus | $n_find | exit $rc, $log |"
done
