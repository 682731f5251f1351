#!/usr/bin/env python3
"""Runs two training benchmarks alternately on the same machine and prints their ratios.

Each side is `spectune [bench flags]` or `pytorch [twin.py flags]`; the defaults compare
spectune with the PyTorch + transformers + PEFT twin (benches/peers/twin.py). Both start from
the same point: `spectune bench --save-init` writes the random weights, the LoRA init and the
batch once (cached under target/peers-init/), spectune regenerates the same values from the same
seed, and the twin loads them. Rounds alternate the order (A B, B A, ...) so slow drifts of a
shared machine hit both sides alike; figures are medians over rounds of per-run medians.

Printed: tokens/s and peak RSS of each side with the ratios A/B, and the losses of both sides
after every step of the first round with their largest relative difference (in f32 they must
agree within 1%).

Examples:
  benches/peers/compare.py --shape smollm2-135m --threads 2                # f32, spectune vs PyTorch
  benches/peers/compare.py --shape smollm2-135m --dtype bf16 --threads 2   # bf16 frozen weights
  benches/peers/compare.py --a "spectune --checkpointing" --b spectune     # checkpointing cost
  benches/peers/compare.py --a "spectune --method speclora" --b spectune   # SpecLoRA vs LoRA
  benches/peers/compare.py --a spectune --b spectune@/tmp/old/spectune     # a refactor: this build
      against another binary (e.g. the previous commit's), same flags, alternating
  benches/peers/compare.py --model FILE.gguf --batch 1 --seq-len 128       # a real (quantized) file:
      spectune trains on it as stored; the twin gets the same model dequantized to an f32 HF folder
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def spectune_bin():
    b = os.environ.get("SPECTUNE_BIN") or os.path.join(ROOT, "target", "release", "spectune")
    if not os.environ.get("SPECTUNE_BIN"):
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "spectune"], cwd=ROOT, check=True)
    return b


def python_bin():
    return subprocess.run([os.path.join(HERE, "env.sh")], check=True, capture_output=True, text=True).stdout.strip()


def last_json(out):
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in output:\n" + out[-2000:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--model", help="a real checkpoint (.gguf or HF folder) instead of --shape; the twin loads it "
                    "dequantized to f32 (written once by spectune bench --save-init)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--a", default="spectune", help='side A: "spectune [bench flags]" or "pytorch [twin flags]"')
    ap.add_argument("--b", default="pytorch", help="side B (default: the PyTorch twin)")
    ap.add_argument("--json-out", help="also write every run's JSON here")
    a = ap.parse_args()

    what = ["--model", os.path.abspath(a.model)] if a.model else ["--shape", a.shape, "--dtype", a.dtype]
    label = "model-" + os.path.basename(os.path.normpath(a.model)) if a.model else f"{a.shape}-{a.dtype}"
    common = what + ["--rank", str(a.rank), "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--lr", str(a.lr)]
    runs = ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    sb = spectune_bin()
    sides = {"A": shlex.split(a.a), "B": shlex.split(a.b)}
    init = None
    if any(s[0] == "pytorch" for s in sides.values()):
        init = os.path.join(ROOT, "target", "peers-init", f"{label}-r{a.rank}-b{a.batch}-t{a.seq_len}-s{a.seed}-lr{a.lr}")
        if not os.path.exists(os.path.join(init, "bench.json")):
            subprocess.run([sb, "bench", *common, *runs, "--save-init", init], check=True)
        py = python_bin()

    def cmd(side):
        kind, extra = sides[side][0], sides[side][1:]
        if kind == "spectune" or kind.startswith("spectune@"):
            binary = kind.split("@", 1)[1] if "@" in kind else sb
            return [binary, "--threads", str(a.threads), "bench", *common, *runs, "--json", *extra]
        if kind == "pytorch":
            return [py, os.path.join(HERE, "twin.py"), "--init", init, "--threads", str(a.threads), *runs, "--json", *extra]
        sys.exit(f"unknown side {kind!r}: use spectune, spectune@BINARY or pytorch")

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    results = {"A": [], "B": []}
    load = []
    for r in range(a.rounds):
        order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
        for side in order:
            load.append(os.getloadavg()[0])
            p = subprocess.run(cmd(side), capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"side {side} failed ({' '.join(cmd(side))}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            j = last_json(p.stdout)
            results[side].append(j)
            print(f"round {r + 1} {side} ({sides[side][0]}): {j['tokens_per_s']:.0f} tokens/s, median step {j['step_time_median_s']:.2f} s, "
                  f"peak RSS {j['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

    def med(side, key):
        return statistics.median(x[key] for x in results[side])

    name = {s: " ".join(v) for s, v in sides.items()}
    ta, tb = med("A", "tokens_per_s"), med("B", "tokens_per_s")
    ma, mb = med("A", "peak_rss_bytes"), med("B", "peak_rss_bytes")
    print()
    print(f"date {datetime.date.today()} | {platform.node()} | {a.model or a.shape} {'' if a.model else a.dtype} r{a.rank} batch {a.batch}x{a.seq_len} | "
          f"{a.threads} threads | {a.rounds} rounds x {a.steps} timed steps | load average during runs {min(load):.2f}-{max(load):.2f}")
    print(f"A = {name['A']}\nB = {name['B']}")
    print(f"{'':10} {'tokens/s':>10} {'peak RSS MiB':>13} {'grad norm':>11} {'loss after ' + str(a.warmup + a.steps) + ' steps':>22}")
    for s in "AB":
        j = results[s][0]
        print(f"{s:10} {med(s, 'tokens_per_s'):>10.1f} {med(s, 'peak_rss_bytes') / 2**20:>13.0f} {j['grad_norm']:>11.4e} {j['final_loss']:>22.5f}")
    print(f"ratio A/B: tokens/s {ta / tb:.3f}x, peak RSS {ma / mb:.3f}x")
    if "useful_flops_per_step" in results["A"][0]:
        f = results["A"][0]["useful_flops_per_step"]
        print(f"useful GFLOP/s: A {f * ta / results['A'][0]['tokens_per_step'] / 1e9:.1f}, B {f * tb / results['A'][0]['tokens_per_step'] / 1e9:.1f}")
    la, lb = results["A"][0]["losses"], results["B"][0]["losses"]
    if len(la) == len(lb):
        rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb))
        print("losses A: " + " ".join(f"{x:.5f}" for x in la))
        print("losses B: " + " ".join(f"{x:.5f}" for x in lb))
        print(f"largest relative loss difference: {rel:.2e} ({'within' if rel <= 0.01 else 'NOT within'} 1%)")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"A": results["A"], "B": results["B"], "sides": name}, f, indent=1)


if __name__ == "__main__":
    main()
