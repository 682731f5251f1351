#!/usr/bin/env python3
"""Writes the golden fixtures of tests/golden.rs from the reference implementation
(HF transformers + PEFT on PyTorch, CPU, float32).

For each variant (`tied`, `untied`) it writes into tests/data/golden/<variant>/:

  config.json            HF config of a tiny random LlamaForCausalLM
  model.safetensors      its float32 weights (save_pretrained(safe_serialization=True))
  expected.safetensors   inputs and reference outputs (see EXPECTED below and README.md)

Rerun (from the repository root, in a venv with torch, transformers, peft, safetensors, numpy):

  python tests/data/golden/make_golden.py

The output is deterministic for given library versions (fixed seeds, one CPU thread,
deterministic algorithms). See README.md beside this file for the versions used.
"""

import os
import shutil
import sys
import tempfile

import numpy as np
import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))

SEED = 20240611
BATCH, SEQ = 2, 7
PAD_LAST = 2  # the second row's last PAD_LAST positions are right padding
IGNORE = -100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8

# Names written to expected.safetensors.
EXPECTED = """
  (right-padded batch: the second row's last 2 positions are padding)
  input_ids      I64 [2, 7]      token ids (padded positions hold token 0)
  attention_mask I64 [2, 7]      1 = real token, 0 = right padding
  targets        I64 [2, 7]      per-position next-token targets as spectune takes them:
                                 targets[b, t] = input_ids[b, t+1] when positions t and t+1
                                 are both real, else -100
  logits         F32 [2, 7, 97]  base model logits, model(input_ids, attention_mask=mask);
                                 rows at padded positions are not meaningful (compare only
                                 where attention_mask = 1)
  loss           F32 [1]         base model mean cross-entropy over counted targets
  lora_loss      F32 [1]         the same loss with the LoRA adapters below attached
  <peft name>        F32         every LoRA tensor, e.g.
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in]
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight [out, r]
  <peft name>.grad   F32         d lora_loss / d that tensor

  left_padded.<name> for every name above except the LoRA values: the same batch with the second
                                 row's real tokens moved right by 2 and the padding first
                                 (the batch in which the key mask matters)
"""


def config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )


def init_weights(model: LlamaForCausalLM, gen: torch.Generator) -> None:
    """Random weights scaled so that every activation and the logits are O(1):
    embeddings (and an untied lm_head) ~ N(0, 0.25²), linears ~ N(0, 1/in),
    RMSNorm weights ~ 1 + N(0, 0.1²) (not all ones, so a misapplied norm weight shows)."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """spectune's loss: mean over counted per-position targets (ignore -100)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="mean")


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = ids[b, t+1] when positions t and t+1 are both real, else -100."""
    targets = torch.full_like(ids, IGNORE)
    both = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    targets[:, :-1] = torch.where(both, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return targets


def make_variant(name: str, tie: bool) -> dict:
    gen = torch.Generator().manual_seed(SEED + (1 if tie else 0))
    torch.manual_seed(SEED)
    cfg = config(tie)
    model = LlamaForCausalLM(cfg).float().eval()
    init_weights(model, gen)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in ["config.json", "model.safetensors"]:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(out_dir, f))
        extra = sorted(set(os.listdir(tmp)) - {"config.json", "model.safetensors"})
        if extra:
            print(f"  {name}: dropped {extra}")

    # Fixed input: 2 x 7 ids, the second row right-padded by 2 (the batch the names without a
    # prefix describe). With right padding and causal attention no real query can see a padded
    # key, so the key mask cannot change a compared number; the `left_padded.` batch (the same
    # second row moved right by 2, padding first) is what exercises key masking.
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - PAD_LAST :] = 0
    ids[mask == 0] = cfg.pad_token_id
    left_ids, left_mask = ids.clone(), mask.clone()
    left_ids[1] = torch.cat([torch.full((PAD_LAST,), cfg.pad_token_id), ids[1, : SEQ - PAD_LAST]])
    left_mask[1] = torch.cat([torch.zeros(PAD_LAST, dtype=torch.long), torch.ones(SEQ - PAD_LAST, dtype=torch.long)])
    batches = {"": (ids, mask, next_token_targets(ids, mask)), "left_padded.": (left_ids, left_mask, next_token_targets(left_ids, left_mask))}

    tensors = {}
    report = []
    # Base model: logits and loss.
    with torch.no_grad():
        m64 = LlamaForCausalLM(cfg).double().eval()
        m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        for prefix, (b_ids, b_mask, b_targets) in batches.items():
            logits = model(input_ids=b_ids, attention_mask=b_mask).logits.float()
            loss = mean_ce(logits, b_targets)
            if prefix == "":
                # Equivalence with HF's own shifted loss (labels = ids, -100 at padding). It holds
                # for right padding only: with left padding HF would also count the last pad
                # position predicting the first real token, which spectune's targets leave out.
                labels = torch.where(b_mask == 1, b_ids, torch.full_like(b_ids, IGNORE))
                hf_loss = model(input_ids=b_ids, attention_mask=b_mask, labels=labels).loss
                assert torch.allclose(loss, hf_loss, rtol=1e-6, atol=0), (loss.item(), hf_loss.item())
            real = b_mask.bool()
            ref_err = float("nan")
            if prefix == "":
                # Size of the reference's own f32 rounding: the same model run in float64 (HF
                # keeps its RMSNorm, softmax and RoPE tables in float32 even then: an estimate).
                # Right padding only: in float64, HF's float32 softmax turns a fully masked
                # (left-pad) query row into NaN, which then reaches the real rows.
                logits64 = m64(input_ids=b_ids, attention_mask=b_mask).logits
                ref_err = ((logits.double() - logits64)[real].abs().max() / logits64[real].abs().max()).item()
            tensors[prefix + "input_ids"] = b_ids.to(torch.int64).contiguous()
            tensors[prefix + "attention_mask"] = b_mask.to(torch.int64).contiguous()
            tensors[prefix + "targets"] = b_targets.contiguous()
            tensors[prefix + "logits"] = logits.contiguous()
            tensors[prefix + "loss"] = loss.reshape(1).float().contiguous()
            report.append(f"{prefix or 'right_padded.'}loss {loss.item():.6f}, max |logit| {logits[real].abs().max().item():.3f}, f32-vs-f64 reference logits {ref_err:.2e} of max |logit|" if ref_err == ref_err else f"{prefix}loss {loss.item():.6f}, max |logit| {logits[real].abs().max().item():.3f}")

    # PEFT LoRA on all seven linears; B random so that A's gradients are not zero.
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none", use_rslora=False, init_lora_weights=True)
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    # PEFT names without the adapter name (as in adapter_model.safetensors) -> parameter.
    by_ptr = {p.data_ptr(): p for p in pm.parameters() if p.requires_grad}
    sd = get_peft_model_state_dict(pm)
    assert len(sd) == 2 * len(TARGETS) * cfg.num_hidden_layers, sorted(sd)
    params = {key: by_ptr[v.data_ptr()] for key, v in sorted(sd.items())}
    for key, p in params.items():
        tensors[key] = p.detach().float().contiguous().clone()
    for prefix, (b_ids, b_mask, b_targets) in batches.items():
        pm.zero_grad()
        lora_loss = mean_ce(pm(input_ids=b_ids, attention_mask=b_mask).logits, b_targets)
        lora_loss.backward()
        tensors[prefix + "lora_loss"] = lora_loss.detach().reshape(1).float().contiguous()
        gmax = 0.0
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, key
            tensors[prefix + key + ".grad"] = p.grad.float().contiguous().clone()
            gmax = max(gmax, p.grad.abs().max().item())
        report.append(f"{prefix or 'right_padded.'}lora_loss {lora_loss.item():.6f}, max |grad| {gmax:.3e}")

    exp_path = os.path.join(out_dir, "expected.safetensors")
    # No header metadata: its key order is not stable, and byte-identical reruns are wanted.
    save_file(tensors, exp_path)
    os.chmod(exp_path, 0o644)
    print(f"  {name}:\n    " + "\n    ".join(report))
    return tensors


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}")
    for name, tie in [("tied", True), ("untied", False)]:
        make_variant(name, tie)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(HERE) for f in fs)
    print(f"tests/data/golden: {total} bytes")
    assert total < 1 << 20, "fixtures must stay under 1 MB"


if __name__ == "__main__":
    main()
