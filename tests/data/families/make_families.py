"""Tiny random-weight checkpoints of each decoder family with transformers' logits, loss and stock
PEFT LoRA gradients, for the family golden tests. Each family switches on the features that make
it different (RoPE scaling, sliding windows shorter than the probe, soft-caps, q/k norms, fused
projections, biases), so a feature left out or mis-bound shows up in the numbers.

  python tests/data/families/make_families.py [OUT_DIR]   (default: next to this script)

Needs torch, transformers, peft and safetensors; their versions go into OUT_DIR/versions.json.
Everything runs in f32 on the CPU with eager attention. T = 12, V = 128. Per family it writes:

OUT_DIR/<family>/config.json, model.safetensors -- the checkpoint (save_pretrained).
OUT_DIR/<family>/golden.safetensors:
  input_ids        [2, T] i64     the probe (ids >= 3)
  logits           [2, T, V] f32  model(input_ids).logits, no mask
  input_ids_padded [2, T] i64     input_ids with row 1's last 3 ids replaced by the pad id 0
  attention_mask   [2, T] i64     1 = token, 0 = padding (row 0 all ones, row 1 right-padded by 3)
  logits_padded    [2, T, V] f32  model(input_ids_padded, attention_mask).logits; only the unpadded
                                  positions are meaningful to compare (causal attention: they equal
                                  `logits` there). At padded positions transformers lets the pad
                                  query attend to the real keys before it.
  labels           [2, T] i64     input_ids_padded with -100 where attention_mask is 0
  loss             [] f32         model(input_ids_padded, attention_mask, labels=labels).loss. The
                                  labels are NOT pre-shifted: transformers shifts inside, so the
                                  logits at position t score labels[t + 1], and the loss is the mean
                                  cross-entropy over all (row, t) with labels[t + 1] != -100
                                  (here 11 + 8 = 19 terms), i.e. a token mean across the batch.
OUT_DIR/<family>/lora/adapter_model.safetensors, adapter_config.json -- a stock PEFT LoRA,
  LoraConfig(r=4, lora_alpha=8, lora_dropout=0, target_modules="all-linear") (every linear but
  the output head; scaling alpha / r = 2), with every lora_A and lora_B set to seeded N(0, 0.2^2)
  values (B nonzero, so both get gradients), written by PeftModel.save_pretrained (its README.md
  model card is removed). Keys as PEFT writes them, e.g.
  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in] and ...lora_B.weight [out, r].
OUT_DIR/<family>/lora_grads.safetensors:
  lora_loss        [] f32         the LoRA model's loss on the padded batch with labels (as `loss`)
  <every adapter key>  f32        d lora_loss / d that lora_A or lora_B, same key and shape as in
                                  adapter_model.safetensors

Before writing, the script checks its numbers: padded logits equal the unpadded ones at the real
positions (and row 1's real prefix run alone); `loss` equals the shifted cross-entropy recomputed
by hand from `logits_padded`; the saved adapter reloaded by PEFT onto the saved checkpoint gives
`lora_loss` again; the f32 gradients equal an f64 run's, and a central difference of the loss
along a random unit direction matches the gradient's directional derivative."""
import json
import os
import sys
import zlib

import torch
import transformers
from safetensors.torch import save_file

# PEFT writes the expanded "all-linear" target_modules from a Python set, whose order follows string hashing:
# a fixed hash seed keeps adapter_config.json byte-identical from one regeneration to the next.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
T = 12
VOCAB = 128
PAD = 3  # row 1 of the padded batch ends in PAD pad tokens
PAD_ID = 0
RANK, ALPHA = 4, 8  # LoRA r and lora_alpha (scaling alpha / r = 2)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family(name, cls_cfg, cls_model, **kw):
    return name, cls_cfg, cls_model, {**COMMON, **kw}


def cases():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    return [
        family("llama", LlamaConfig, LlamaForCausalLM, head_dim=8),
        family("llama3", LlamaConfig, LlamaForCausalLM, head_dim=8, tie_word_embeddings=True,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        family("llama_bias", LlamaConfig, LlamaForCausalLM, head_dim=8, attention_bias=True, mlp_bias=True),
        family("mistral", MistralConfig, MistralForCausalLM, head_dim=8, sliding_window=5),
        family("qwen2", Qwen2Config, Qwen2ForCausalLM, head_dim=8, tie_word_embeddings=True),
        family("qwen3", Qwen3Config, Qwen3ForCausalLM, head_dim=16, tie_word_embeddings=True),
        family("gemma2", Gemma2Config, Gemma2ForCausalLM, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
               attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
               hidden_activation="gelu_pytorch_tanh"),
        family("gemma3", Gemma3TextConfig, Gemma3ForCausalLM, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        family("phi3", Phi3Config, Phi3ForCausalLM, max_position_embeddings=64,
               rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                                "short_factor": [1.0 + 0.1 * i for i in range(4)],
                                "long_factor": [1.0 + 1.5 * i for i in range(4)]}),
    ]


def padded_batch(ids):
    """Row 1 right-padded by PAD positions: (ids with pad id 0 there, attention_mask, labels)."""
    ids_p = ids.clone()
    mask = torch.ones_like(ids)
    ids_p[1, T - PAD:] = PAD_ID
    mask[1, T - PAD:] = 0
    labels = ids_p.masked_fill(mask == 0, -100)
    return ids_p, mask, labels


def shifted_mean_ce(logits, labels):
    """transformers' causal-LM loss by hand: logits at t score the label at t + 1; mean over labels != -100."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    return -(lp[keep].gather(-1, tgt[keep].unsqueeze(-1))).sum() / keep.sum()


def close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max |diff| {err} > {tol} * {scale}"
    return err


def lora_goldens(name, model, d, ids_p, mask, labels):
    """Stock PEFT LoRA (all-linear) on `model` with seeded A and B; saves <d>/lora/ and <d>/lora_grads.safetensors.
    Returns (lora_loss, number of adapted modules, worst f32-vs-f64 gradient error, finite-difference error)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    pm = get_peft_model(model, cfg).eval()
    g = torch.Generator().manual_seed(zlib.crc32((name + "/lora").encode()))
    lora = [(n, p) for n, p in pm.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    with torch.no_grad():
        for n, p in lora:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ld = os.path.join(d, "lora")
    pm.save_pretrained(ld, safe_serialization=True)
    readme = os.path.join(ld, "README.md")  # PEFT's model-card boilerplate, not needed
    if os.path.exists(readme):
        os.remove(readme)

    pm.zero_grad()
    out = pm(input_ids=ids_p, attention_mask=mask, labels=labels)
    out.loss.backward()
    # PEFT's file keys drop the adapter name: ...q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight.
    grads = {n.replace(".default.", "."): p.grad.detach().float().contiguous() for n, p in lora}
    assert all(p.requires_grad for _, p in lora)
    frozen_with_grad = [n for n, p in pm.named_parameters() if p.grad is not None and not (".lora_A." in n or ".lora_B." in n)]
    assert not frozen_with_grad, f"{name}: frozen weights got gradients: {frozen_with_grad[:3]}"
    saved = load_file(os.path.join(ld, "adapter_model.safetensors"))
    assert set(saved) == set(grads), f"{name}: gradient keys differ from adapter keys: {set(saved) ^ set(grads)}"
    assert all(g.abs().max() > 0 for g in grads.values()), f"{name}: a zero LoRA gradient"
    lora_loss = out.loss.detach().float()
    save_file({"lora_loss": lora_loss.reshape(()).contiguous(), **grads}, os.path.join(d, "lora_grads.safetensors"))

    # Self-checks. (a) The saved adapter, loaded by PEFT onto a fresh copy of the saved base, gives the same loss.
    fresh = type(pm.get_base_model()).from_pretrained(d, attn_implementation="eager").eval()
    re_pm = PeftModel.from_pretrained(fresh, ld).eval()
    with torch.no_grad():
        re_loss = re_pm(input_ids=ids_p, attention_mask=mask, labels=labels).loss
    close(re_loss, lora_loss, 1e-6, f"{name}: reloaded adapter loss")
    # (b) The gradient against f64 autograd and against an f64 central difference along a random direction.
    pm64 = re_pm.double()
    named64 = [(n.replace(".default.", "."), p) for n, p in pm64.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    names64, l64 = [n for n, _ in named64], [p for _, p in named64]
    for p in l64:
        p.requires_grad_(True)
        p.grad = None
    # (transformers' loss casts logits to f32, so the f64 path takes the cross-entropy by hand.)
    loss64 = shifted_mean_ce(pm64(input_ids=ids_p, attention_mask=mask).logits, labels)
    loss64.backward()
    close(lora_loss, loss64, 1e-5, f"{name}: lora_loss f32 vs f64")
    worst = 0.0
    for n, p in zip(names64, l64):
        worst = max(worst, close(grads[n], p.grad, 1e-4, f"{name}: {n} f32 vs f64 gradient"))
    gd = torch.Generator().manual_seed(7)
    dirs = [torch.randn(p.shape, generator=gd, dtype=torch.float64) for p in l64]
    norm = sum((v * v).sum() for v in dirs).sqrt()
    dirs = [v / norm for v in dirs]  # a unit direction over all LoRA parameters together
    # transformers' RMSNorm computes in f32 even in an f64 model, so the difference carries f32 rounding that
    # grows as the step shrinks (measured: 1e-2 → ≤ 2e-4 relative, 1e-4 → up to 2e-2): step 1e-2 along the unit
    # direction, tolerance 1e-3 relative (a wrong gradient is off by O(1)).
    eps = 1e-2
    with torch.no_grad():
        def at(s):
            for p, v in zip(l64, dirs):
                p.add_(v, alpha=s)
            val = shifted_mean_ce(pm64(input_ids=ids_p, attention_mask=mask).logits, labels).item()
            for p, v in zip(l64, dirs):
                p.sub_(v, alpha=s)
            return val
        fd = (at(eps) - at(-eps)) / (2 * eps)
    an = sum((p.grad * v).sum().item() for p, v in zip(l64, dirs))
    fd_err = abs(fd - an) / abs(an)
    assert fd_err <= 1e-3, f"{name}: directional derivative {an} vs central difference {fd}"
    return lora_loss.item(), len(grads) // 2, worst, fd_err


def main():
    torch.manual_seed(0)
    import peft
    import safetensors
    versions = {"transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__}
    for name, cfg_cls, model_cls, kw in cases():
        cfg = cfg_cls(**kw)
        cfg._attn_implementation = "eager"
        torch.manual_seed(zlib.crc32(name.encode()))
        model = model_cls(cfg).eval()
        # Larger-than-init weights so every term matters at f32 (norm weights away from 1/0).
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in name else 1.0))
                else:
                    p.copy_(torch.randn_like(p) * 0.2)
        ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
        ids_p, mask, labels = padded_batch(ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            out = model(input_ids=ids_p, attention_mask=mask, labels=labels)
            logits_p, loss = out.logits.float(), out.loss.float()
            # Self-checks: causal attention, so padding at the end of row 1 changes nothing before it; row 1's
            # real prefix run alone agrees too; the loss is the shifted mean cross-entropy of the padded logits.
            close(logits_p[0], logits[0], 1e-5, f"{name}: padded row 0 vs unpadded")
            close(logits_p[1, :T - PAD], logits[1, :T - PAD], 1e-5, f"{name}: padded row 1 real positions vs unpadded")
            alone = model(input_ids=ids[1:, :T - PAD]).logits.float()
            close(logits_p[1, :T - PAD], alone[0], 1e-5, f"{name}: padded row 1 vs its prefix alone")
            close(loss, shifted_mean_ce(logits_p, labels), 1e-5, f"{name}: loss vs cross-entropy by hand")
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        for extra in ["generation_config.json"]:
            p = os.path.join(d, extra)
            if os.path.exists(p):
                os.remove(p)
        save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous(),
                   "input_ids_padded": ids_p.to(torch.int64).contiguous(),
                   "attention_mask": mask.to(torch.int64).contiguous(), "logits_padded": logits_p.contiguous(),
                   "labels": labels.to(torch.int64).contiguous(), "loss": loss.reshape(()).contiguous()},
                  os.path.join(d, "golden.safetensors"))
        lora_loss, n_adapted, worst, fd_err = lora_goldens(name, model, d, ids_p, mask, labels)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}, "
              f"loss {loss.item():.6f}, LoRA on {n_adapted} modules, lora_loss {lora_loss:.6f} "
              f"(gradient: f32 vs f64 max err {worst:.1e}, vs central difference rel err {fd_err:.1e})")
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
