"""PEFT's own module-selection decisions, recorded as JSON for tests/targets.rs (which checks
spectune's `peft::targets::TargetSpec` against every one of them).

  python tests/data/targets/make_targets.py > tests/data/targets/cases.json

Needs peft, torch and transformers. Two kinds of cases:

- `key_cases`: a PEFT config (the selection keys of adapter_config.json: `target_modules`,
  `exclude_modules`, `layers_to_transform`, `layers_pattern`) and `selected`: the module keys of
  `keys` for which `peft.tuners.tuners_utils.check_target_module_exists(LoraConfig(**config), key)`
  is true (an excluded module is not selected). `error` replaces `selected` where LoraConfig
  refuses the config or matching raises (a bad regular expression): PEFT's message.
- `model_cases`: a tiny transformers model wrapped by `get_peft_model`, for the selections that
  depend on the model ("all-linear" is expanded by PEFT into the model's linear layers, less the
  output head): `linears` lists every nn.Linear but the head, `adapted` those PEFT put a LoRA on.
"""
import json
import sys

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

LLAMA = [f"model.layers.{i}.{m}" for i in (0, 1, 10) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
          "mlp.down_proj")]
OTHER = [
    "lm_head", "q_proj", "layers.0.q_proj", "model.layers.0.self_attn.xq_proj", "model.layers.0.self_attn.q_proj.base",
    "model.layers.2.self_attn.qkv_proj", "model.layers.2.mlp.gate_up_proj",
    "model.layers.1.mlp.experts.0.down_proj", "model.layers.3.block_sparse_moe.experts.1.w1",
    "transformer.h.0.attn.c_attn", "transformer.h.3.mlp.c_fc", "model.decoder.layers.1.self_attn.q_proj",
    "model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj_extra",
    "model.layers.1.adapter.layers.0.self_attn.q_proj",
]
KEYS = LLAMA + OTHER

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["proj"]},
    {"target_modules": ["qkv_proj", "gate_up_proj", "c_attn", "w1"]},
    {"target_modules": ".*\\.(q|v)_proj"},
    {"target_modules": "model\\.layers\\.[01]\\.self_attn\\.(q|k)_proj"},
    {"target_modules": "q_proj"},
    {"target_modules": ".*layers\\.1\\..*"},
    {"target_modules": ".*(?:self_attn|attn)\\..*"},
    {"target_modules": "model.layers.1.*"},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["v_proj"]},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ".*layers\\.1\\..*"},
    {"target_modules": ".*_proj", "exclude_modules": ["v_proj", "mlp.down_proj"]},
    {"target_modules": ".*_proj", "exclude_modules": ".*\\.mlp\\..*"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1, 10], "layers_pattern": "layers"},
    {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [0], "layers_pattern": "h"},
    {"target_modules": ["down_proj", "w1"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["down_proj", "w1"], "layers_to_transform": [0]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj"], "layers_to_transform": 1, "layers_pattern": ["layers"]},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [0], "layers_pattern": "layers|h"},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [0], "layers_pattern": "(?:layers|h)"},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "decoder.layers"},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["q_proj"], "layers_to_transform": [0, 1],
     "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": []},
    # Refused by PEFT:
    {"target_modules": ".*q_proj", "layers_to_transform": [0]},
    {"target_modules": ".*q_proj", "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_pattern": "layers"},
    {"target_modules": "model.(layers"},
    {"target_modules": ["q_proj"], "exclude_modules": "(unclosed"},
]


def key_cases():
    out = []
    for config in CONFIGS:
        case = {"config": config}
        try:
            cfg = LoraConfig(**config)
            case["selected"] = [k for k in KEYS if check_target_module_exists(cfg, k)]
        except Exception as e:  # noqa: BLE001 -- the refusal itself is the golden
            case.pop("selected", None)
            case["error"] = f"{type(e).__name__}: {e}"
        out.append(case)
    return out


def tiny(kind):
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, head_dim=8))
    if kind == "qwen2_tied":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    if kind == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common))
    raise ValueError(kind)


MODEL_CONFIGS = [
    {"target_modules": "all-linear"},
    {"target_modules": "ALL-LINEAR"},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj", "model.layers.0.mlp.down_proj"]},
    {"target_modules": "all-linear", "exclude_modules": ".*\\.layers\\.[02]\\..*"},
    {"target_modules": ["q_proj", "v_proj", "qkv_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ".*\\.mlp\\.[a-z_]*proj"},
]


def model_cases():
    out = []
    for kind in ("llama", "qwen2_tied", "phi3"):
        for config in MODEL_CONFIGS:
            torch.manual_seed(0)
            model = tiny(kind)
            head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head]
            pm = get_peft_model(model, LoraConfig(r=2, **config))
            adapted = sorted(pm.base_model.targeted_module_names)
            out.append({"model": kind, "config": config, "linears": linears, "adapted": adapted})
    return out


def main():
    json.dump({"peft": peft.__version__, "transformers": transformers.__version__, "keys": KEYS, "key_cases": key_cases(),
               "model_cases": model_cases()}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
