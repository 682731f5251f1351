#!/usr/bin/env bash
# Prints the Python interpreter of the PyTorch twin, creating its environment on first use:
# a venv in target/peers-venv with torch, transformers, peft and safetensors from PyPI.
# Set SPECTUNE_PEERS_PYTHON to use an existing interpreter instead (it must import those four).
set -euo pipefail
if [[ -n "${SPECTUNE_PEERS_PYTHON:-}" ]]; then
  echo "$SPECTUNE_PEERS_PYTHON"
  exit 0
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/target/peers-venv"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch, transformers, peft, safetensors" 2>/dev/null; then
  echo "creating $venv (torch, transformers, peft, safetensors from PyPI; a few minutes)" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet torch transformers peft safetensors >&2
fi
echo "$venv/bin/python"
