#!/usr/bin/env bash
# Every row, table and passkey of benchmarks/results/quality_sepllm.md (issues B and J), on one device:
#
#   bash benchmarks/quality_all.sh [cpu|cuda|triton] [threads]
#
# The streamed rows and the passkeys run on the device given (default cpu, one thread); the why tables
# and the torch-reference checks run on the CPU. Days of one CPU core in all: every row file is written
# as it goes (benchmarks/results/quality/), so a stopped run keeps what it measured, and the report
# (tables, json, plot) is rewritten after each command.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}
threads=${2:-1}
py=${PYTHON:-python}
rows() { "$py" benchmarks/quality_sepllm.py --device "$device" --threads "$threads" "$@"; }
why() { "$py" benchmarks/quality_why.py "$@" --threads "$threads"; }
passkey() { "$py" benchmarks/passkey.py --device "$device" --threads "$threads" --length 2048 --trials 1 "$@"; }

# perplexity rows: the paper's c=324 and c=800 configurations, StreamingLLM at SepLLM's average
# attended cells (c=292, c=562), this repository's variants (v800)
rows --model smollm2 --text shakespeare --tokens 65537 --rows c800,v800
rows --model smollm2 --text python --tokens 10241 --rows "streamingllm c=800 w=796,sepllm-slide"
rows --model qwen0.5b --text shakespeare --tokens 65537 --rows "c324,c800"
rows --model qwen0.5b --text shakespeare --tokens 20481 --rows "v800"
rows --model qwen0.5b --text python --tokens 10241 --rows "c800,v800"
rows --model qwen1.5b --text shakespeare --tokens 20481 --rows "c800,streamingllm c=324 w=320,sepllm c=324 s=32 w=224"

# native against the torch reference over a prefix of the stream (CPU)
"$py" benchmarks/quality_sepllm.py --model smollm2 --text shakespeare --check 1200 --rows "c=800,sepllm-slide"
"$py" benchmarks/quality_sepllm.py --model qwen0.5b --text shakespeare --check 1200 --rows "c=800 w=796,c=800 s=64"
"$py" benchmarks/quality_sepllm.py --model qwen1.5b --text shakespeare --check 1000 --rows "streamingllm c=800"

# why: attention mass under full attention, separator lifetimes, separator set, cache storage type
for m in smollm2 qwen0.5b qwen1.5b; do
  why mass --model "$m" --text shakespeare --tokens 3072 --skip 1024
  why lifetimes --model "$m" --text shakespeare --tokens 65536
done
why mass --model smollm2 --text python --tokens 3072 --skip 1024
for m in smollm2 qwen0.5b; do why lifetimes --model "$m" --text python --tokens 65536; done
why sepset --model smollm2 --text shakespeare --tokens 8192
why sepset --model smollm2 --text python --tokens 8192
why sepset --model qwen0.5b --text shakespeare --tokens 4096
why sepset --model qwen1.5b --text shakespeare --tokens 2048
why kvtype --model qwen0.5b --text shakespeare --tokens 4096 --rows "sepllm c=800 s=64 w=256"
why kvtype --model qwen1.5b --text shakespeare --tokens 2048 --rows "sepllm c=800 s=64 w=256"

# passkeys: every c=800 mode on every model, and with the instruction pinned as initial tokens
for m in smollm2 qwen0.5b qwen1.5b; do
  passkey --model "$m"
done
for m in smollm2 qwen0.5b; do
  passkey --model "$m" --pin-intro
done
