//! GGUF (v3) reader: metadata, tensor table, mapped tensors, llama.cpp → HF names.
