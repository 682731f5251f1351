#!/usr/bin/env bash
# Shows that the emulated driver catches the kinds of bug it exists for. Each bug is planted by a
# small edit, the affected test is run under the emulation and must fail with the expected
# message, and the file is restored (also on error or Ctrl-C):
#
#   1. off-by-one index in a kernel: rms_norm_fwd reads x[row·c + c] (`i <= c`)
#      → the guard page after x: CUDA_ERROR_ILLEGAL_ADDRESS naming rms_norm_fwd
#   2. missing __syncthreads: gemm_f32 computes from its shared tiles before all threads stored
#      them → wrong products (the f32 matmul check fails)
#   3. a barrier in divergent code: rms_norm_fwd returns early for threads ≥ 32, the rest reach
#      block_sum's __syncthreads → CUDA_ERROR_LAUNCH_FAILED naming the kernel
#   4. a warp shuffle with a lane gone: attn_bwd_prep returns early for lane 5
#      → CUDA_ERROR_LAUNCH_FAILED naming the kernel and the lane
#   5. arguments swapped between Rust and a kernel: rms_norm_fwd gets (eps, c) for (int c, float
#      eps) → the launch's signature check names the kernel and the parameter
#
# Bugs 1-4 edit only cuda/*.cu, so only the emulated driver is rebuilt and the test binary built
# from the clean tree runs them (the PTX it embeds is the clean one; under the emulation the PTX
# supplies only the kernels' signatures, which these edits leave alone). Bug 5 edits Rust and
# rebuilds the test binary.
#
#   cuda/emu/planted-bugs.sh      # about 6 minutes on 2 cores, most of it building the test binary
set -uo pipefail
cd "$(dirname "$0")/../.."
command -v nvcc >/dev/null || eval "$(cuda/install-toolkit.sh)"
log=target/cuda-emu/planted-bugs.log
mkdir -p target/cuda-emu
: >"$log"
backup=""
restore() {
    if [ -n "$backup" ]; then
        cp "$backup" "${backup%.planted-orig}" && rm -f "$backup"
        backup=""
    fi
}
trap restore EXIT INT TERM

test_binary() {
    cargo test --release --features cuda --test backends --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="backends": print(m["executable"])'
}

# plant FILE OLD NEW: replaces the one occurrence of OLD in FILE.
plant() {
    local file="$1" old="$2" new="$3"
    backup="$file.planted-orig"
    cp "$file" "$backup"
    python3 - "$file" "$old" "$new" <<'EOF' || exit 1
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
if s.count(old) != 1:
    sys.exit(f"{path}: expected exactly one occurrence of {old!r}")
open(path, "w").write(s.replace(old, new))
EOF
}

# expect NAME TEST PATTERN [rebuild]: the test must fail and its output contain PATTERN.
ok=0
clean_exe="$(test_binary)" # built from the unmodified tree
[ -n "$clean_exe" ] || { echo "the test binary did not build" >&2; exit 1; }
clean_copy="target/cuda-emu/backends-clean"
cp "$clean_exe" "$clean_copy"
expect() {
    local name="$1" test="$2" pattern="$3" exe="$clean_copy" out
    if [ "${4:-}" = rebuild ]; then
        exe="$(test_binary)"
        [ -n "$exe" ] || { echo "$name: the test binary did not build" | tee -a "$log"; return; }
    fi
    out="$(LD_LIBRARY_PATH="$PWD/target/cuda-emu/lib" "$exe" --ignored --exact "$test" 2>&1)"
    echo "$out" | grep -E "CUDA \(emulated\)|panicked|error" | head -5 | sed "s/^/  /" >>"$log"
    if echo "$out" | grep -q "test result: FAILED" && echo "$out" | grep -qE "$pattern"; then
        echo "$name: CAUGHT ($test failed with /$pattern/)" | tee -a "$log"
        ok=$((ok + 1))
    else
        echo "$name: NOT CAUGHT ($test)" | tee -a "$log"
        echo "$out" | tail -20
    fi
}

echo "== 1. off-by-one index in rms_norm_fwd" | tee -a "$log"
plant cuda/norm.cu "for (int i = threadIdx.x; i < c; i += blockDim.x) ss += xr[i] * xr[i];" \
    "for (int i = threadIdx.x; i <= c; i += blockDim.x) ss += xr[i] * xr[i];"
cuda/emulate.sh build 2>/dev/null
expect "off-by-one" cuda::norm "CUDA_ERROR_ILLEGAL_ADDRESS.*kernel rms_norm_fwd.*out-of-bounds access.*0 bytes past the end"
restore

echo "== 2. missing __syncthreads in gemm_f32" | tee -a "$log"
plant cuda/matmul.cu "            Bs[kb][j] = (gj < N && gkb < K) ? B[gkb * sbk + gj * sbn] : 0.f;
        }
        __syncthreads();" "            Bs[kb][j] = (gj < N && gkb < K) ? B[gkb * sbk + gj * sbn] : 0.f;
        }"
cuda/emulate.sh build 2>/dev/null
expect "missing __syncthreads" cuda::matmul "relative error"
restore

echo "== 3. __syncthreads in divergent code (rms_norm_fwd)" | tee -a "$log"
plant cuda/norm.cu "    const long row = blockIdx.x;
    const float* xr = x + row * c;
    float ss = 0.f;" "    const long row = blockIdx.x;
    if (threadIdx.x >= 32) return;
    const float* xr = x + row * c;
    float ss = 0.f;"
cuda/emulate.sh build 2>/dev/null
expect "divergent barrier" cuda::norm "CUDA_ERROR_LAUNCH_FAILED.*kernel rms_norm_fwd.*__syncthreads reached after 224 of the block's 256 threads returned"
restore

echo "== 4. a warp shuffle after a lane returned (attn_bwd_prep)" | tee -a "$log"
plant cuda/attention.cu "    if (row >= rows) return;
    float s = 0.f;" "    if (row >= rows || lane == 5) return;
    float s = 0.f;"
cuda/emulate.sh build 2>/dev/null
expect "lane gone" cuda::attention "CUDA_ERROR_LAUNCH_FAILED.*kernel attn_bwd_prep.*lane 5 has already returned"
restore

echo "== 5. (c, eps) passed as (eps, c) to rms_norm_fwd" | tee -a "$log"
plant src/backend/cuda/kernels.rs "            Arg::I32(c as i32),
            Arg::F32(eps as f32),
        ];" "            Arg::F32(eps as f32),
            Arg::I32(c as i32),
        ];"
cuda/emulate.sh build 2>/dev/null
expect "argument order" cuda::norm "kernel rms_norm_fwd \(cuda/norm.cu\): parameter 4 is a 4-byte integer .*caller passed a 4-byte float" rebuild
restore

cuda/emulate.sh build 2>/dev/null
rm -f "$clean_copy"
echo "planted bugs caught: $ok of 5 (log: $log); every file restored" | tee -a "$log"
[ "$ok" = 5 ]
