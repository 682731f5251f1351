#!/usr/bin/env bash
# GPU verification, the ground truth the emulated driver (cuda/emulate.sh) stands in for, in two
# halves so that one short visit to a GPU machine without a Rust toolchain answers everything:
#
#   cuda/gpu-test.sh build     # here (toolkit + Rust): the CUDA test binaries and spectune, built
#                              # with --features cuda, stripped, in target/gpu-bundle (< 60 MiB,
#                              # no model files: benches use random weights of named shapes)
#   gpu-test.sh run [OUT]      # there, from inside the bundle: ≤ 8 minutes; log in OUT/gpu-log.txt
#                              # (default: the bundle's out/); exits non-zero if any part failed
#
# The run: every CUDA test body (tests/backends.rs cuda::*, tests/cuda_emu.rs; a missing GPU is a
# failure), compute-sanitizer (memcheck on the norm test, racecheck on the matmul test) where the
# machine has it, and `spectune bench --device cuda` on the llama-3.2-3b and llama-3.1-8b shapes
# (LoRA r16, bf16 frozen weights, the 8B one checkpointed) with tokens/s, useful FLOP/s and peak
# device memory. Each part has a time limit; the limits add up to 7.5 minutes.
# Results there are GPU-verified; the same tests under cuda/emulate.sh are only "CUDA (emulated)".
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$self/bin/backends" ]; then
    bundle="$self" # running the staged copy inside the bundle
else
    cd "$self/.." # the repository's cuda/
    bundle="$PWD/target/gpu-bundle"
fi

# test_exe NAME: the path of the test binary cargo built for tests/NAME.rs.
test_exe() {
    cargo test --release --features cuda --test "$1" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$1"
}

case "${1:-}" in
build)
    set -e
    command -v nvcc >/dev/null || eval "$(cuda/install-toolkit.sh)"
    rm -rf "$bundle" && mkdir -p "$bundle/bin"
    for t in backends cuda_emu; do
        exe="$(test_exe "$t")"
        [ -n "$exe" ] || { echo "error: tests/$t.rs did not build" >&2; exit 1; }
        cp "$exe" "$bundle/bin/$t"
    done
    cargo build --release --features cuda --bin spectune
    cp target/release/spectune "$bundle/bin/spectune"
    strip "$bundle"/bin/*
    cp cuda/gpu-test.sh "$bundle/"
    size=$(du -sm "$bundle" | cut -f1)
    du -sh "$bundle"/bin/* >&2
    echo "bundle: $bundle, $size MiB (limit 60)" >&2
    [ "$size" -le 60 ] || { echo "error: the bundle is over 60 MiB" >&2; exit 1; }
    ;;
run)
    out="${2:-$bundle/out}"
    mkdir -p "$out"
    bin="$bundle/bin"
    export RUST_BACKTRACE=1
    fails=0
    part() { # part NAME SECONDS CMD...: runs CMD under a time limit, counts a failure
        local name="$1" secs="$2"
        shift 2
        echo "## $name (limit ${secs}s)"
        local t0=$SECONDS
        timeout "$secs" "$@"
        local rc=$?
        echo "## $name: exit $rc after $((SECONDS - t0)) s"
        [ "$rc" = 0 ] || fails=$((fails + 1))
    }
    {
        echo "# spectune CUDA verification on a GPU, $(date -u +%Y-%m-%dT%H:%MZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || echo "nvidia-smi: not found"
        # Every CUDA test body; the SmolLM2 one needs a model download, which this machine cannot do.
        part "CUDA test bodies (tests/backends.rs cuda::*)" 120 "$bin/backends" --ignored --skip smollm2 --test-threads=1
        part "device memory tests (tests/cuda_emu.rs)" 20 "$bin/cuda_emu" --ignored --test-threads=1 --nocapture
        if command -v compute-sanitizer >/dev/null; then
            part "compute-sanitizer memcheck: cuda::norm" 45 compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/backends" --ignored --exact cuda::norm
            part "compute-sanitizer racecheck (shared memory): cuda::matmul" 45 compute-sanitizer --tool racecheck --error-exitcode 1 \
                "$bin/backends" --ignored --exact cuda::matmul
        else
            echo "## compute-sanitizer: not on this machine (skipped)"
        fi
        part "bench llama-3.2-3b, LoRA r16, bf16" 90 "$bin/spectune" bench --shape llama-3.2-3b --device cuda --dtype bf16 --method lora --rank 16 \
            --batch 1 --seq-len 1024 --steps 3 --warmup 1
        part "bench llama-3.1-8b, LoRA r16, bf16, checkpointed" 130 "$bin/spectune" bench --shape llama-3.1-8b --device cuda --dtype bf16 --method lora \
            --rank 16 --batch 1 --seq-len 1024 --steps 3 --warmup 1 --checkpointing
        echo "# parts failed: $fails"
    } 2>&1 | tee "$out/gpu-log.txt"
    grep -q "^# parts failed: 0$" "$out/gpu-log.txt"
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
