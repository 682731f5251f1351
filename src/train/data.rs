//! Training data: JSONL (text, prompt/completion, chat) and plain text, tokenized and batched.
