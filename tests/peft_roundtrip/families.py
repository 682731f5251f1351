#!/usr/bin/env python3
"""PEFT round trip for the decoder families beyond Llama: stock transformers + PEFT load the
LoRA adapter that `spectune train` wrote and reproduce spectune's logits.

For each family given (default: gemma2, qwen3 and phi3 — phi3's adapters sit on its fused
`qkv_proj` and `gate_up_proj`), in a temporary folder:

  1. copies the tiny checkpoint of tests/data/families/<family> and gives it a character-level
     tokenizer (128 symbols, one per id; the same as tests/families_cli.rs);
  2. `spectune train --method lora --rank 4 --steps 4 --lr 2e-2` (all-linear targets) -> run/adapter,
     a non-identity adapter (B moved off zero);
  3. `spectune merge` of it -> merged (spectune's merged weights, f32);
  4. in Python (float32, eager attention): `PeftModel.from_pretrained(base, run/adapter)` on the
     original folder against transformers' `merged` folder, on two probe sequences of 16 ids;
     and the adapter's effect (PEFT vs the plain base) to show the comparison is not trivial.

PASS when max |Δlogits| PEFT-vs-spectune ≤ 1e-4 · max(1, max|logit|) and the effect is > 1e-3.
Exit 0 when every family passes, 1 otherwise, 2 on a set-up failure.

Usage (from the repository root, after `cargo build --release`):

    python tests/peft_roundtrip/families.py [--spectune target/release/spectune] [FAMILY ...]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = "the cat sat on the mat. the dog sat on the log. " * 8


def symbol(i):
    return chr(i) if 32 <= i <= 126 else f"<{i}>"


def with_tokenizer(src, dst):
    dst.mkdir(parents=True)
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(src / f, dst / f)
    vocab = {symbol(i): i for i in range(128)}
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 2, "content": symbol(2), "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    (dst / "tokenizer_config.json").write_text(json.dumps({"eos_token": symbol(2), "add_bos_token": False}))


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"set-up failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        sys.exit(2)
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spectune", default=str(REPO / "target/release/spectune"))
    ap.add_argument("families", nargs="*", default=["gemma2", "qwen3", "phi3"])
    a = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    probe = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data.txt").write_text(DATA)
        for fam in a.families:
            model = tmp / fam
            with_tokenizer(REPO / "tests/data/families" / fam, model)
            out, merged = tmp / f"{fam}-run", tmp / f"{fam}-merged"
            run([a.spectune, "train", "--model", str(model), "--data", str(tmp / "data.txt"), "--out", str(out), "--method", "lora",
                 "--rank", "4", "--steps", "4", "--lr", "2e-2", "--batch", "2", "--seq-len", "24", "--threads", "2"])
            run([a.spectune, "merge", "--model", str(model), "--adapter", str(out / "adapter"), "--out", str(merged)])
            load = lambda p: AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32, attn_implementation="eager").eval()
            base = load(model)
            with torch.no_grad():
                plain = base(input_ids=probe).logits
                peft = PeftModel.from_pretrained(base, out / "adapter").eval()
                got = peft(input_ids=probe).logits
                want = load(merged)(input_ids=probe).logits
            modules = sorted({k.split(".lora_")[0].split(".")[-1] for k in peft.state_dict() if ".lora_A" in k})
            diff = (got - want).abs().max().item()
            effect = (got - plain).abs().max().item()
            tol = 1e-4 * max(1.0, want.abs().max().item())
            ok = diff <= tol and effect > 1e-3
            failed |= not ok
            print(f"{fam:8s} modules {','.join(modules):50s} max|PEFT - spectune merge| {diff:.2e} (tol {tol:.1e})  "
                  f"effect {effect:.3f}  {'PASS' if ok else 'FAIL'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
