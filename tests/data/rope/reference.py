"""RoPE inverse-frequency tables and attention factors computed by transformers, for
tests/rope_scaling.rs. Regenerate with: python tests/data/rope/reference.py > tests/data/rope/reference.json
(needs torch and transformers; the committed JSON records their versions)."""
import json
import math

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CASES = [
    # name, head_dim, max_position_embeddings, rope_parameters, seq_len
    ("default", 64, 2048, {"rope_type": "default", "rope_theta": 10000.0}, None),
    ("partial", 96, 4096, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, None),
    ("linear", 128, 8192, {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}, None),
    ("llama3", 64, 131072, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, None),
    ("llama3_8", 128, 131072, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, None),
    ("yarn", 128, 131072, {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                           "original_max_position_embeddings": 32768}, None),
    ("yarn_mscale", 64, 163840, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}, None),
]
half = 48
short = [1.0 + 0.05 * i for i in range(half)]
long = [1.0 + 0.9 * i for i in range(half)]
for seq_len, name in [(1024, "longrope_short"), (8000, "longrope_long")]:
    CASES.append((name, 96, 131072, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                                     "original_max_position_embeddings": 4096}, seq_len))

out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
for name, head_dim, max_pos, params, seq_len in CASES:
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=dict(params))
    fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if fn is None and "partial_rotary_factor" in params:
        # Llama's default ignores partial_rotary_factor; Phi-3's honours it.
        from transformers import Phi3Config
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
        cfg = Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters=dict(params), pad_token_id=0)
        inv, att = Phi3RotaryEmbedding.compute_default_rope_parameters(config=cfg, device="cpu")
    elif fn is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(config=cfg, device="cpu", seq_len=seq_len)
    else:
        inv, att = fn(config=cfg, device="cpu", seq_len=seq_len)
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    out["cases"].append({"name": name, "head_dim": head_dim, "rotary_dim": dim, "max_position_embeddings": max_pos,
                         "rope_parameters": params, "seq_len": seq_len or 0,
                         "inv_freq": [float(x) for x in inv.to(torch.float64)], "attention_factor": float(att)})
print(json.dumps(out, indent=1))
