//! Export to plain PEFT LoRA, and merging adapters into an HF checkpoint.
