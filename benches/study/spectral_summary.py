#!/usr/bin/env python3
"""Per-module summary of a `spectune spectrum --control --json` report against its noise rows.

    python3 benches/study/spectral_summary.py SPECTRUM.json

For each module type: how many matrices have ρ_1 = σ_1(W')/σ_1(W0) above 1 and above the noise
control's ρ_1 (W0 + G, G Gaussian with ‖G‖ = ‖ΔW‖), the mean of ρ_1..ρ_5 − 1 against the noise, and
per block (top / mid / bottom) the mean principal-angle 1 − cos θ of the left singular subspaces,
its ratio to the noise, and in how many matrices it exceeds the noise; the share of ‖ΔW‖² in
W0's top singular block against a random change's share. Standard library only.
"""
import json
import statistics as st
import sys


def main(path):
    r = json.load(open(path))
    for mod in sorted({m["module"] for m in r["matrices"]}):
        ms = [m for m in r["matrices"] if m["module"] == mod]
        n = len(ms)
        rho1 = [m["ratio"]["top"][0] for m in ms]
        rho1c = [m["control"]["ratio"]["top"][0] for m in ms]
        t5 = [st.fmean(m["ratio"]["top"][:5]) for m in ms]
        t5c = [st.fmean(m["control"]["ratio"]["top"][:5]) for m in ms]
        rel = [m["rel_delta"] for m in ms]
        print(f"{mod}: {n} matrices, ‖ΔW‖/‖W0‖ mean {st.fmean(rel):.2e} (min {min(rel):.2e}, max {max(rel):.2e})")
        print(
            f"  ρ_1 − 1: mean {st.fmean(rho1) - 1:.2e} (noise {st.fmean(rho1c) - 1:.2e}); ρ_1 > 1 in {sum(x > 1 for x in rho1)}/{n}, "
            f"above the noise's in {sum(a > b for a, b in zip(rho1, rho1c))}/{n}"
        )
        print(
            f"  mean(ρ_1..5) − 1: {st.fmean(t5) - 1:.2e} (noise {st.fmean(t5c) - 1:.2e}); above the noise's in "
            f"{sum(a > b for a, b in zip(t5, t5c))}/{n}"
        )
        for blk in ("top", "mid", "bottom"):
            d = [1 - st.fmean(m["cos_u"][blk]) for m in ms]
            dc = [1 - st.fmean(m["control"]["cos_u"][blk]) for m in ms]
            print(
                f"  U {blk:<6} 1 − cos θ: {st.fmean(d):.2e} (noise {st.fmean(dc):.2e}, ratio {st.fmean(d) / st.fmean(dc):.2f}); "
                f"more than the noise in {sum(a > b for a, b in zip(d, dc))}/{n}"
            )
        share = st.fmean(m["delta_top_share"] for m in ms)
        print(f"  ΔW share in W0's top-{ms[0]['k']} block: {100 * share:.2f} % (random {100 * ms[0]['delta_top_share_random']:.2f} %)")
        print(f"  intruder dimensions: {sum(m['intruders'] for m in ms)}")


if __name__ == "__main__":
    main(sys.argv[1])
