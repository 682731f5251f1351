#!/usr/bin/env python3
"""LoRA vs SpecLoRA across the study's tasks: one Markdown row per stage, from finished runs.

    python3 benches/study/tasks.py [RESULTS]   # default docs/spectral-study/commonsense

For every stage folder under RESULTS (rate-grid extensions `*-lr-*` aside) with runs of both `lora` and `speclora` (as
`benches/study/commonsense.sh sync` copies them), at the rate each method has the most seeds of
(the rate `compare` kept): the base model's accuracy, each method's accuracy and reported-half
loss as mean ± sample std over its seeds, the accuracy difference SpecLoRA − LoRA with Welch's t,
the per-seed paired differences (the same seed gives both methods the same batch order), and
the mean training time of a run, and the accuracy of always giving the most frequent answer
position of the scored questions ("constant": a strategy a model can learn where the choices keep
one order, as BoolQ's "yes"/"no" do; read from the held-out file that base.json's key names, when
it is on this machine, sampled as `compare --eval-questions` samples).
Then the pooled view over tasks: how many tasks favour each method, and the mean difference.
Standard library only.
"""
import glob
import json
import math
import os
import re
import statistics
import sys


def ms(v):
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def runs_of(stage, method):
    """{lr: {seed: run}} of one method in one stage."""
    out = {}
    for f in glob.glob(os.path.join(stage, "runs", method, "lr*", "seed*", "result.json")):
        parts = f.split(os.sep)
        lr, seed = parts[-3][2:], int(parts[-2][4:])
        out.setdefault(lr, {})[seed] = json.load(open(f))["run"]
    return out


def kept(by_lr):
    """The rate with the most seeds (ties: the lower mean selection-half loss) and its runs."""
    if not by_lr:
        return None, {}
    most = max(len(v) for v in by_lr.values())
    full = {lr: v for lr, v in by_lr.items() if len(v) == most}
    lr = min(full, key=lambda k: statistics.fmean(r["val_loss"] for r in full[k].values()))
    return lr, full[lr]


def sample_questions(total, n):
    """`compare --eval-questions`'s sample: a seeded partial Fisher–Yates shuffle, in file order.

    The same SplitMix64 stream (seed 0x5eed) and swaps as `sample_questions` in
    src/train/compare.rs; checked by scoring the 300 BoolQ questions it picks with `spectune eval
    --task mc` for two adapters, which gave `compare`'s accuracies to the last digit."""
    mask, x, idx = (1 << 64) - 1, 0x5EED, list(range(total))
    if n >= total:
        return idx
    for i in range(n):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        j = i + (z ^ (z >> 31)) % (total - i)
        idx[i], idx[j] = idx[j], idx[i]
    return sorted(idx[:n])


def constant_answer(key):
    """Accuracy of always answering the most frequent gold position, or None without the file."""
    m = re.search(r"held out: (\S+)\)", key)
    if not m or not os.path.exists(m.group(1)):
        return None
    golds = [json.loads(line)["gold"] for line in open(m.group(1), encoding="utf-8") if line.strip()]
    n = re.search(r"eval_questions=(\d+)", key)
    picked = [golds[i] for i in sample_questions(len(golds), int(n.group(1)) if n else len(golds))]
    return max(picked.count(g) for g in set(picked)) / len(picked)


def fmt(m, s, n):
    return f"{m:.4f}" if n < 2 else f"{m:.4f} ± {s:.4f}"


def main(root):
    rows, diffs = [], []
    def order(p):  # s1, s2, …, s10, then q1, …: by letter (s before q) and number
        m = re.match(r"([a-z])(\d+)", os.path.basename(p))
        return (m.group(1) != "s", int(m.group(2))) if m else (True, 0)

    for stage in sorted(glob.glob(os.path.join(root, "*")), key=order):
        # Stages named `…-lr-up`/`…-lr-down` extend another stage's rate grid: not another task.
        if not os.path.exists(os.path.join(stage, "base.json")) or "-lr-" in os.path.basename(stage):
            continue
        (llr, lora), (slr, spec) = kept(runs_of(stage, "lora")), kept(runs_of(stage, "speclora"))
        if not lora or not spec:
            continue
        base = json.load(open(os.path.join(stage, "base.json")))
        la, sa = [r["accuracy"] for r in lora.values()], [r["accuracy"] for r in spec.values()]
        ll, sl = [r["eval_loss"] for r in lora.values()], [r["eval_loss"] for r in spec.values()]
        (lm, ls), (sm, ss) = ms(la), ms(sa)
        d = sm - lm
        se = math.sqrt((ls**2 / len(la) if len(la) > 1 else 0) + (ss**2 / len(sa) if len(sa) > 1 else 0))
        t = f"{d / se:+.2f}" if len(la) > 1 and len(sa) > 1 and se > 0 else "–"
        paired = [spec[s]["accuracy"] - lora[s]["accuracy"] for s in sorted(set(lora) & set(spec))]
        const = constant_answer(base["key"])
        rows.append(
            f"| {os.path.basename(stage)} | {base['accuracy']:.4f} | {'–' if const is None else f'{const:.4f}'} | {llr} / {slr} | {len(la)} / {len(sa)} "
            f"| {fmt(lm, ls, len(la))} | {fmt(sm, ss, len(sa))} | {d:+.4f} | {t} "
            f"| {', '.join(f'{p:+.3f}' for p in paired)} | {fmt(*ms(ll), len(ll))} | {fmt(*ms(sl), len(sl))} "
            f"| {statistics.fmean(r['seconds'] for r in lora.values()):.0f} / {statistics.fmean(r['seconds'] for r in spec.values()):.0f} |"
        )
        diffs.append(d)
    print("| stage | base acc | constant | rate L / S | seeds L / S | LoRA acc | SpecLoRA acc | S − L | Welch t | paired by seed | LoRA loss | SpecLoRA loss | train s/run L / S |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if diffs:
        print(
            f"\n{len(diffs)} tasks: SpecLoRA ahead on {sum(d > 0 for d in diffs)}, LoRA ahead on {sum(d < 0 for d in diffs)}, "
            f"tied on {sum(d == 0 for d in diffs)}; mean difference {statistics.fmean(diffs):+.4f}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/spectral-study/commonsense")
