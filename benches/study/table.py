#!/usr/bin/env python3
"""Markdown table of a study stage from its finished runs, before or after `compare` ends.

    python3 benches/study/table.py docs/spectral-study/commonsense/STAGE

Reads STAGE/base.json and STAGE/runs/<method>/lr<lr>/seed<seed>/result.json (as
`benches/study/commonsense.sh sync` copies them), and prints, per method and learning rate, the
seeds finished, mean ± sample std of the selection-half loss, the reported-half loss and the
multiple-choice accuracy; the rate `compare` would choose (lowest mean selection-half loss among
the rates with the most seeds) is starred. Standard library only.
"""
import glob
import json
import os
import statistics
import sys


def ms(v):
    m = statistics.fmean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return m, s


def main(stage):
    base = json.load(open(os.path.join(stage, "base.json")))
    runs = {}
    for f in sorted(glob.glob(os.path.join(stage, "runs", "*", "lr*", "seed*", "result.json"))):
        parts = f.split(os.sep)
        method, lr = parts[-4], float(parts[-3][2:])
        runs.setdefault(method, {}).setdefault(lr, []).append(json.load(open(f))["run"])
    print(f"base model: held-out loss {base['loss']:.4f}, accuracy {base['accuracy']:.4f}\n")
    print("| method | lr | seeds | selection loss | reported loss | acc | time/run |")
    print("|---|---|---|---|---|---|---|")
    for method, by_lr in runs.items():
        most = max(len(v) for v in by_lr.values())
        full = {lr: v for lr, v in by_lr.items() if len(v) == most}
        best = min(full, key=lambda lr: ms([r["val_loss"] for r in full[lr]])[0])
        for lr, v in sorted(by_lr.items()):
            sel, rep, acc, sec = (ms([r[k] for r in v]) for k in ("val_loss", "eval_loss", "accuracy", "seconds"))
            star = " *" if lr == best else ""
            print(
                f"| {method} | {lr:.0e}{star} | {len(v)} | {sel[0]:.4f} ± {sel[1]:.4f} | {rep[0]:.4f} ± {rep[1]:.4f} "
                f"| {acc[0]:.4f} ± {acc[1]:.4f} | {sec[0]:.0f} s |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
