#!/usr/bin/env python3
"""Every method on the tasks that ran all of them: one Markdown table, methods by tasks.

    python3 benches/study/methods.py [RESULTS]   # default docs/spectral-study/commonsense

A task is a group of stage folders whose runs share every setting but the method and rate (for
ARC-Easy, stages 1–4; for SIQA, stage 8's LoRA and SpecLoRA runs and stage 12's others; for
WinoGrande, stages 10, 13 and 14), as `benches/study/commonsense.sh sync` copies them. Per method and
task: the rate kept (the one with the most seeds; ties broken by the lower mean selection-half
loss, the rule `compare` chooses by), held-out accuracy as mean ± sample std over its seeds, and
Welch's t of its accuracy against LoRA's. Standard library only.
"""
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tasks import kept, runs_of  # noqa: E402  (the same reader and rate rule as the cross-task table)

TASKS = [
    ("ARC-Easy (570)", ["s1-arc-easy-lora-speclora", "s2-arc-easy-more-methods", "s3-arc-easy-lr-up", "s4-arc-easy-lr-down"]),
    ("SIQA (300)", ["s8-siqa", "s12-siqa-all-methods"]),
    ("WinoGrande (300)", ["s10-winogrande", "s13-winogrande-all-methods", "s14-winogrande-lr-down"]),
]
METHODS = ["lora", "speclora", "speclora-svd", "dora", "pissa", "spectral-a"]


def runs_over(stages, method):
    """{lr: {seed: run}} of one method over a task's stages (tasks.py's per-stage reader, merged)."""
    out = {}
    for stage in stages:
        for lr, seeds in runs_of(stage, method).items():
            out.setdefault(lr, {}).update(seeds)
    return out


def main(root):
    cells, base = {}, {}
    for task, stages in TASKS:
        dirs = [os.path.join(root, s) for s in stages]
        b = [os.path.join(d, "base.json") for d in dirs if os.path.exists(os.path.join(d, "base.json"))]
        base[task] = json.load(open(b[0]))["accuracy"] if b else None
        for m in METHODS:
            lr, runs = kept(runs_over(dirs, m))
            if runs:
                cells[task, m] = (lr, [r["accuracy"] for r in runs.values()])
    tasks = [t for t, _ in TASKS]
    print("| method | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    print("| base | " + " | ".join("–" if base[t] is None else f"{base[t]:.4f}" for t in tasks) + " |")
    for m in METHODS:
        row = []
        for t in tasks:
            if (t, m) not in cells:
                row.append("–")
                continue
            lr, acc = cells[t, m]
            mean = statistics.fmean(acc)
            txt = f"{mean:.4f}" + (f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else "")
            txt += f" @ {lr}" + ("" if len(acc) == 3 else f" ({len(acc)} seeds)")
            ref = cells.get((t, "lora"))
            if m != "lora" and ref and len(acc) > 1 and len(ref[1]) > 1:
                se = math.sqrt(statistics.variance(acc) / len(acc) + statistics.variance(ref[1]) / len(ref[1]))
                if se > 0:
                    txt += f", t {(mean - statistics.fmean(ref[1])) / se:+.2f}"
            row.append(txt)
        print(f"| {m} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/spectral-study/commonsense")
