#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT twin of one `spectune bench` training step.

Reads the starting point written by `spectune bench --save-init DIR` (config.json +
model.safetensors, the PEFT adapter in DIR/adapter with lora_A random and lora_B zero,
batch.safetensors, bench.json) and trains exactly what spectune trains: LoRA r/alpha from the
adapter config on all seven linears of every layer, AdamW (betas, eps, weight decay 0 from
bench.json), the same batch every step, loss = mean next-token cross-entropy (HF shifts the
labels itself; spectune's targets are the same next tokens).

The step is timed like spectune's: forward + loss, backward, global gradient norm, optimizer
step. Peak RSS is VmHWM, reset after the model is built (/proc/self/clear_refs <- 5) as
spectune does, so both report the peak over the training steps.

With --json the last stdout line is one JSON object with the same field names as
`spectune bench --json`.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time


def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    before = vm("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return vm("VmHWM") <= before + (64 << 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="folder written by spectune bench --save-init")
    ap.add_argument("--gemm-ceiling", type=int, metavar="SIZE",
                    help="instead of training: time torch.matmul(A, B.T) at SIZE^3 in f32 and in bf16")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: bench.json)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None,
                    help="model dtype (default: the stored weights'); bf16 = the whole model in bf16, as PEFT users run it")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant) per decoder layer")
    ap.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default=None,
                    help="torch.set_float32_matmul_precision (on CPU, medium multiplies in bf16 through oneDNN; high is highest)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    if a.matmul_precision:
        torch.set_float32_matmul_precision(a.matmul_precision)
    if a.gemm_ceiling:
        n = a.gemm_ceiling
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            torch.matmul(x, w.T)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                torch.matmul(x, w.T)
                ts.append(time.perf_counter() - t0)
            print(f"torch GEMM {n}^3 {dt}, {torch.get_num_threads()} threads: {2 * n**3 / statistics.median(ts) / 1e9:.1f} GFLOP/s")
        return
    if not a.init:
        ap.error("--init is required")
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    with open(os.path.join(a.init, "bench.json")) as f:
        s = json.load(f)
    steps = a.steps if a.steps is not None else s["steps"]
    warmup = a.warmup if a.warmup is not None else s["warmup"]
    # --save-init writes f32 and bf16 weights as stored and every other stored dtype (a GGUF's
    # block types) dequantized to f32.
    dtype_name = a.dtype or (s["weights_dtype"] if s["weights_dtype"] in ("f32", "bf16") else "f32")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    kw = {"attn_implementation": "sdpa"}
    major = int(transformers.__version__.split(".")[0])
    kw["dtype" if major >= 5 else "torch_dtype"] = dtype
    # config.json names the architecture (LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v biases).
    model = transformers.AutoModelForCausalLM.from_pretrained(a.init, **kw)
    model.config.use_cache = False
    model = PeftModel.from_pretrained(model, os.path.join(a.init, "adapter"), is_trainable=True)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"], weight_decay=s["weight_decay"])
    batch = load_file(os.path.join(a.init, "batch.safetensors"))
    ids, labels = batch["input_ids"], batch["labels"]
    b, t = ids.shape

    gc.collect()
    setup_peak = vm("VmHWM")
    was_reset = reset_peak()
    losses, times = [], []
    gnorm = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels, use_cache=False)
        loss = out.loss
        loss.backward()
        with torch.no_grad():
            gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        l = loss.item()
        del out, loss
        dt = time.perf_counter() - t0
        losses.append(l)
        if step >= warmup:
            times.append(dt)
    if not (gnorm > 0 and gnorm == gnorm and gnorm != float("inf")):
        sys.exit(f"error: the adapter gradient norm is {gnorm}: this run does not train")
    med = statistics.median(times)
    r = {
        "engine": "pytorch",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": __import__("peft").__version__},
        "model": s["model"], "method": "lora", "rank": s["rank"], "batch": b, "seq_len": t,
        "tokens_per_step": b * t, "steps": steps, "warmup": warmup, "weights_dtype": dtype_name,
        "checkpointing": a.checkpointing, "device": "cpu", "threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "frozen_params": frozen, "trainable_params": trainable,
        "step_time_median_s": med, "step_times_s": times, "tokens_per_s": b * t / med,
        "peak_rss_bytes": vm("VmHWM"), "peak_rss_reset": was_reset, "setup_peak_rss_bytes": setup_peak,
        "grad_norm": gnorm, "losses": losses, "final_loss": losses[-1],
    }
    print(f"pytorch {s['model']} lora r{s['rank']} | {b}x{t} tokens | {dtype_name} | checkpointing {a.checkpointing} | {r['threads']} threads")
    print(f"median step {med:.3f} s | {r['tokens_per_s']:.0f} tokens/s | peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB | grad norm {gnorm:.4e} | loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
