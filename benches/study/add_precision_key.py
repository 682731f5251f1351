#!/usr/bin/env python3
"""Adds ` matmul_precision=LEVEL` to the resume keys of runs that a `compare` binary without that
key field made at LEVEL, so that a newer binary's `--resume` reuses them instead of training them
again. Only for runs that really ran at LEVEL (the stage's `--matmul-precision`).

    python3 benches/study/add_precision_key.py high STAGE_DIR...

STAGE_DIR: a `compare --out` folder (base.json, <method>/lr*/seed*/result.json). Keys that
already name a precision are left alone. Standard library only.
"""
import glob
import json
import os
import sys


def fix(path, level, before):
    rec = json.load(open(path))
    if "matmul_precision=" in rec["key"]:
        return False
    field = f" matmul_precision={level}"
    rec["key"] = rec["key"].replace(before, field + before, 1) if before else rec["key"] + field
    tmp = path + ".tmp"
    json.dump(rec, open(tmp, "w"), indent=2)
    os.replace(tmp, path)
    return True


def main(level, stages):
    for stage in stages:
        n = int(fix(os.path.join(stage, "base.json"), level, None)) if os.path.exists(os.path.join(stage, "base.json")) else 0
        for f in glob.glob(os.path.join(stage, "*", "lr*", "seed*", "result.json")):
            n += fix(f, level, " method=")
        print(f"{stage}: {n} keys updated")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
