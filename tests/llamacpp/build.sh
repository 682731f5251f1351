#!/usr/bin/env bash
# Builds the llama.cpp reference tools used by the optional llama.cpp checks
# (tests/llamacpp/*.sh and the env-gated tests in tests/gguf_export.rs and
# tests/tokenizer.rs) from the llama-cpp-python 0.3.36 sdist, which vendors a
# current llama.cpp together with its tokenizer fixtures (models/ggml-vocab-*).
#
# Usage: tests/llamacpp/build.sh [DIR]   (DIR defaults to $SPECTUNE_LLAMACPP_DIR,
#        then ~/.cache/spectune/llamacpp). About 30-40 min on 2 cores, once.
# Needs: python3 with pip (download only), a C++17 compiler, cmake >= 3.14
# (Debian: apt-get install cmake).
# Afterwards: export SPECTUNE_LLAMACPP=DIR/llama_cpp_python-0.3.36/vendor/llama.cpp
# Note: with GGML_NATIVE on a CPU that reports AMX (seen in a VM), llama.cpp's AMX matmul path
# segfaulted; the tools then run with `-nr` (--no-repack: no extra CPU buffer types), which the
# checks here pass.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-${SPECTUNE_LLAMACPP_DIR:-$HOME/.cache/spectune/llamacpp}}
PY=${SPECTUNE_PEERS_PYTHON:-python3}
mkdir -p "$DIR"
cd "$DIR"
SDIST=llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  # A plain `pip download` fetches the sdist (its metadata step installs only the pure-Python
  # build backend); `--no-binary :all:` would also build cmake itself from source.
  "$PY" -m pip download --no-deps --disable-pip-version-check -q -d . "llama-cpp-python==$VERSION"
fi
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "$SDIST"
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF
nice -n 19 cmake --build "$SRC/build" -j"${JOBS:-2}" --target \
  llama-tokenize llama-perplexity llama-completion llama-quantize
echo "built: $SRC/build/bin"
echo "export SPECTUNE_LLAMACPP=$SRC"
