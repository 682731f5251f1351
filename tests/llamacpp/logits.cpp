// Logits at every position from llama.cpp, for comparison with spectune
// (tests/llamacpp_logits.rs; built and run by tests/llamacpp/logits.sh).
//
// Usage: logits MODEL.gguf IDS.txt OUT.f32 [f16|f32]
//   IDS.txt: token ids separated by whitespace, decoded as one batch of n tokens at
//            positions 0..n-1 with an output requested at every position.
//   OUT.f32: n × n_vocab little-endian f32, row p = the logits after token p.
//   f16|f32: attention precision. f16 (default) = llama.cpp's defaults: f16 KV cache, flash
//            attention chosen automatically (on the CPU it is taken and works in f16).
//            f32 = f32 KV cache and flash attention off, so Q·K and P·V run in f32.
// Weight repacking into extra CPU buffer types is off (use_extra_bufts = false): the AMX
// path it enables crashed on the VM this was written on; plain ggml CPU kernels run instead.
#include "llama.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS.txt OUT.f32 [f16|f32]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    {
        std::ifstream in(argv[2]);
        long v;
        while (in >> v) ids.push_back((llama_token) v);
    }
    if (ids.empty()) {
        fprintf(stderr, "%s: no token ids\n", argv[2]);
        return 2;
    }
    const bool kv_f32 = argc > 4 && strcmp(argv[4], "f32") == 0;

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts = false;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "%s: cannot load the model\n", argv[1]);
        return 1;
    }
    const int n = (int) ids.size();
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = cp.n_threads_batch = 2;
    if (kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context of %d tokens\n", n);
        return 1;
    }
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;  // an output at every position
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[3], "wb");
    if (!out) {
        fprintf(stderr, "%s: cannot write\n", argv[3]);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
            fprintf(stderr, "no logits at position %d\n", i);
            return 1;
        }
    }
    fclose(out);
    fprintf(stderr, "wrote %d x %d logits (attention %s)\n", n, n_vocab, kv_f32 ? "f32, no flash attention" : "defaults");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
