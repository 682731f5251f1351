#!/usr/bin/env python3
"""Optional real-file check: spectune's dequantization of a GGUF equals transformers' own GGUF
loader (which dequantizes with the `gguf` package), tensor by tensor, bit for bit.

spectune writes every weight of the model as f32 (`spectune bench --model FILE --save-init DIR`,
the PyTorch twin's starting point, names in HF order with llama.cpp's q/k permutation undone);
transformers loads FILE with `gguf_file=`; the script compares the two state dicts.

Run (needs torch, transformers, gguf, safetensors, numpy; a release build of spectune):
  python3 tests/data/gguf/compare_with_transformers.py ~/.cache/spectune/qwen2.5-coder-0.5b-q4km/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
Exit status 0 when every tensor is bit-identical.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def main(path):
    path = os.path.abspath(path)
    spectune = os.environ.get("SPECTUNE_BIN") or os.path.join(ROOT, "target", "release", "spectune")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([spectune, "bench", "--model", path, "--batch", "1", "--seq-len", "2", "--steps", "1", "--save-init", d],
                       check=True, stdout=subprocess.DEVNULL)
        ours = load_file(os.path.join(d, "model.safetensors"))
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    theirs = m.state_dict()
    bad = []
    for name, v in sorted(ours.items()):
        t = theirs[name].numpy()
        if t.shape != v.shape or not (t.view(np.uint32) == v.view(np.uint32)).all():
            diff = float(np.abs(t - v).max()) if t.shape == v.shape else float("nan")
            bad.append((name, t.shape, v.shape, diff))
    print(f"{type(m).__name__}: {len(ours) - len(bad)} of {len(ours)} tensors bit-identical to transformers' GGUF load")
    for b in bad:
        print("  differs:", *b)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
