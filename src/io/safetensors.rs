//! HF safetensors checkpoints over a memory map: single files and sharded folders.
