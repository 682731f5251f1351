//! HF `config.json` for the Llama family (Llama, Qwen2, Mistral names) → [`LlamaConfig`](super::LlamaConfig).
