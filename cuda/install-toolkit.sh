#!/usr/bin/env bash
# Installs what building `--features cuda` needs on a Debian (bookworm) machine without a GPU:
# Debian's non-free `nvidia-cuda-toolkit` (nvcc 11.8, cuda.h, the libcuda.so stub), then lays out
# the folder cust's build script expects (<root>/include/cuda.h and <root>/lib64/libcuda.so).
# Prints the `export` line for other layouts; idempotent (does nothing where nvcc and the layout exist).
#
#   cuda/install-toolkit.sh            # install if missing, print exports
#   eval "$(cuda/install-toolkit.sh)"  # ...and apply them to this shell
set -euo pipefail

# /opt/cuda is one of the roots cust's build script (find_cuda_helper) searches by default, so
# with this layout no environment variable is needed; CUDA_PATH / CUDA_LIBRARY_PATH still win.
root="${SPECTUNE_CUDA_ROOT:-/opt/cuda}"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

if ! command -v nvcc >/dev/null 2>&1; then
    echo "installing nvidia-cuda-toolkit (Debian non-free) ..." >&2
    list=/etc/apt/sources.list.d/spectune-nonfree.sources
    if ! grep -rqs "non-free" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main contrib non-free non-free-firmware\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$codename" | $sudo tee "$list" >/dev/null
    fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >&2
fi

# cust's build script wants one root with include/cuda.h and lib64/ holding libcuda.so.
multiarch="$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
libdir=""
for d in "/usr/lib/$multiarch" "/usr/lib/$multiarch/stubs" /usr/lib/cuda/lib64 /usr/local/cuda/lib64/stubs; do
    if [ -e "$d/libcuda.so" ]; then libdir="$d"; break; fi
done
if [ -z "$libdir" ]; then
    echo "error: libcuda.so not found after installing nvidia-cuda-toolkit" >&2
    exit 1
fi
if [ ! -e "$root/include/cuda.h" ] || [ ! -e "$root/lib64/libcuda.so" ]; then
    $sudo mkdir -p "$root"
    $sudo ln -sfn /usr/include "$root/include"
    $sudo ln -sfn "$libdir" "$root/lib64"
fi
# find_cuda_helper appends lib64 to each CUDA_LIBRARY_PATH entry itself.
echo "export CUDA_PATH=$root CUDA_LIBRARY_PATH=$root"
