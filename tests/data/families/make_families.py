"""Tiny random-weight checkpoints of each decoder family with transformers' logits at every
position, for the family golden tests. Each family switches on the features that make it
different (RoPE scaling, sliding windows shorter than the probe, soft-caps, q/k norms, fused
projections, biases), so a feature left out or mis-bound shows up in the logits.

  python tests/data/families/make_families.py [OUT_DIR]   (default: next to this script)

Writes OUT_DIR/<family>/{config.json, model.safetensors, golden.safetensors}; golden holds
`input_ids` [2, T] (i64) and `logits` [2, T, vocab] (f32) from transformers in f32 (eager
attention). Needs torch, transformers and safetensors; the versions go into versions.json."""
import json
import os
import sys
import zlib

import torch
import transformers
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
T = 12
VOCAB = 128
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


def main():
    torch.manual_seed(0)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
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
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        for extra in ["generation_config.json"]:
            p = os.path.join(d, extra)
            if os.path.exists(p):
                os.remove(p)
        save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()}, os.path.join(d, "golden.safetensors"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}")
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
