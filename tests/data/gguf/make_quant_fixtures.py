#!/usr/bin/env python3
"""Writes quant_blocks.gguf: for every GGML block type spectune reads, random-but-valid blocks
and the f32 values the reference dequantization gives them.

Tensors (GGUF names):
  <type>           3 rows x 512 columns of <type> blocks (random bytes; every f16 scale
                   replaced by a finite value drawn from a wide range, including 0, -0,
                   subnormals and large magnitudes)
  <type>.expected  the same 3 x 512 values as F32, from gguf.quants.dequantize (the `gguf`
                   Python package, which mirrors llama.cpp's ggml-quants.c dequantize_row_*)

tests/gguf_quant.rs reads both through spectune and compares bit for bit.

Run: python3 tests/data/gguf/make_quant_fixtures.py   (needs `pip install gguf numpy`)
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

ROWS, COLS = 3, 512

# Byte offsets of the f16 scales inside one block, per type (the block layouts of ggml).
SCALES = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}


def scale_values(rng, n):
    """n finite f16 scales: mostly typical weights' magnitudes, plus edge cases."""
    v = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
    edge = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 1.0], dtype=np.float16)
    k = min(len(edge), n // 4)
    v[rng.choice(n, k, replace=False)] = edge[:k]
    return v


def main(out):
    rng = np.random.default_rng(20240517)
    w = gguf.GGUFWriter(out, arch="fixture")
    w.add_description("spectune block-type fixtures: random blocks and their reference dequantization")
    for qt, offs in SCALES.items():
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        n_blocks = ROWS * COLS // block
        raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
        for o in offs:
            raw[:, o:o + 2] = scale_values(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(ROWS, COLS // block * nbytes)
        expected = dequantize(raw, qt).astype(np.float32).reshape(ROWS, COLS)
        assert np.isfinite(expected).all(), qt.name
        name = qt.name.lower()
        w.add_tensor(name, raw, raw_dtype=qt)
        w.add_tensor(name + ".expected", expected)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "quant_blocks.gguf"))
