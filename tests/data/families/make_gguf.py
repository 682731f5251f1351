"""Converts each tiny family checkpoint in this folder to GGUF with llama.cpp's own converter, for
the GGUF golden tests (tests/families_gguf.rs): the GGUF must reproduce the family's golden logits.

  LLAMA_CPP=/path/to/llama.cpp python tests/data/families/make_gguf.py [FAMILY ...]

LLAMA_CPP is a llama.cpp source tree (its `convert_hf_to_gguf.py` and `gguf-py/` are used; the
llama-cpp-python sdist ships one under `vendor/llama.cpp`). Needs torch, safetensors, numpy and
sentencepiece (the converter's own requirements). Writes `<family>/model.f32.gguf` (`--outtype
f32`) for every family folder (or the ones named), and records the llama.cpp commit or version
in `gguf_versions.json`.

The converter refuses a model folder without a tokenizer, and the fixtures have none (their ids
are plain integers < 128). Every family accepts a SentencePiece `tokenizer.model` (Llama, Mistral,
Qwen2/3 try it first, Gemma 2/3 and Phi-3 require it), so the script trains one: a BPE model of
vocabulary exactly 128 on a fixed text, ids 0/1/2 = <pad>/<s>/</s> as in the configs (pad 0,
bos 1, eos 2), byte fallback off, so it is small and the same on every run. Each family folder is
copied with that tokenizer into a temporary folder, converted there, and only the GGUF is kept.
The tokenizer plays no part in the tests (they feed the golden ids directly); it only satisfies
the converter and fills the `tokenizer.ggml.*` metadata."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ["llama", "llama3", "llama_bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
VOCAB = 128


def train_tokenizer(out_dir):
    import sentencepiece as spm
    # A fixed pangram-ish corpus: enough distinct characters and pairs for 128 pieces.
    words = ("the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly "
             "pack my box with five dozen liquor jugs sphinx of black quartz judge my vow "
             "how vexingly quick daft zebras jump bright vixens jump dozy fowl quack").split()
    text = os.path.join(out_dir, "corpus.txt")
    with open(text, "w") as f:
        for i in range(400):
            f.write(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "\n")
    prefix = os.path.join(out_dir, "tok")
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, vocab_size=VOCAB, model_type="bpe", pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, byte_fallback=False, character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.vocab_size() == VOCAB, sp.vocab_size()
    return prefix + ".model"


def llama_cpp_version(root):
    """The commit of the llama.cpp tree when it is a git checkout of its own, else its path."""
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout.strip()
    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) == os.path.realpath(root):
            return "commit " + git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pass
    return "tree " + os.path.abspath(root)


def main():
    root = os.environ.get("LLAMA_CPP")
    if not root or not os.path.isfile(os.path.join(root, "convert_hf_to_gguf.py")):
        sys.exit("set LLAMA_CPP to a llama.cpp source tree (with convert_hf_to_gguf.py and gguf-py/)")
    names = sys.argv[1:] or FAMILIES
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(tmp)
        for name in names:
            src = os.path.join(HERE, name)
            work = os.path.join(tmp, name)
            os.makedirs(work)
            for f in ("config.json", "model.safetensors"):
                shutil.copy(os.path.join(src, f), work)
            shutil.copy(tok, os.path.join(work, "tokenizer.model"))
            out = os.path.join(src, "model.f32.gguf")
            subprocess.run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), work, "--outtype", "f32",
                            "--outfile", out], env=env, check=True)
            print(f"{name}: {os.path.getsize(out)} bytes")
    with open(os.path.join(HERE, "gguf_versions.json"), "w") as f:
        json.dump({"llama.cpp": llama_cpp_version(root)}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
