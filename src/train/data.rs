//! Training data: JSONL (text, prompt/completion, chat) and plain text, tokenized and batched.
//!
//! The pipeline has three stages, each usable alone:
//!
//! 1. **Reading** ([`read_examples`], [`read_files`]): a `.jsonl` file holds one example per line,
//!    in one of three shapes (blank lines are skipped; other keys on a line are ignored):
//!    - `{"text": "..."}`: causal language modelling on the whole text;
//!    - `{"prompt": "...", "completion": "..."}`: the loss is taken on the completion only;
//!    - `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: the
//!      model's chat template is applied and the loss is taken on the assistant answers only;
//!    - `{"query": "...", "choices": ["...", ...], "gold": i}` (multiple choice, the shape
//!      `spectune eval --task mc` reads): trained as prompt = the query and completion =
//!      `" " + choices[gold]` (the query's trailing whitespace moved to the completion, as the
//!      evaluation splits it), so one file serves training and evaluation.
//!
//!    A `.txt` file is one [`Example::Text`]; a folder is every `.jsonl`, `.json` (JSONL) and `.txt`
//!    file directly inside it, in file-name order. A bad line is an [`Error::Format`] naming the
//!    file, the 1-based line number and what was expected there.
//! 2. **Tokenizing** ([`tokenize`], [`tokenize_files`]) into [`Sequence`]s of at most `seq_len`
//!    tokens with next-token targets (`-100` = not counted). Texts longer than `seq_len` are cut
//!    into windows with no token lost; prompt/completion and chat examples longer than `seq_len`
//!    are truncated at the end (counted in [`TokenizeStats::truncated`]).
//! 3. **Batching** ([`Batcher`], [`eval_batches`]) into [`Batch`]es for
//!    [`Decoder::loss`](crate::model::Decoder::loss), either packed (sequences concatenated into full
//!    rows of `seq_len`) or padded (one sequence per row), in a seeded order that a run can save
//!    ([`Batcher::state`]) and resume bit-identically ([`Batcher::restore`]).
//!
//! [`split_eval`], [`split_eval_grouped`] and [`hold_out_files`] hold out examples or whole files
//! for evaluation.
//!
//! ```
//! use spectune::train::data::{Batcher, BatchConfig, Layout, Sequence};
//!
//! // Two short documents; targets are the next tokens, the last of each is not counted.
//! let seqs = vec![
//!     Sequence { ids: vec![5, 6, 7], targets: vec![6, 7, -100] },
//!     Sequence { ids: vec![8, 9], targets: vec![9, -100] },
//! ];
//! let cfg = BatchConfig { batch_size: 2, seq_len: 4, layout: Layout::Padded, pad_id: 0, shuffle: false, drop_last: false, seed: 0 };
//! let mut batcher = Batcher::new(seqs, cfg)?;
//! let b = batcher.next_batch();
//! assert_eq!((b.b, b.t, b.counted), (2, 3, 3));
//! assert_eq!(b.ids, [5, 6, 7, 8, 9, 0]);
//! assert_eq!(b.targets, [6, 7, -100, 9, -100, -100]);
//! assert_eq!(b.key_mask.as_deref(), Some(&[true, true, true, true, true, false][..]));
//! # Ok::<(), spectune::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// The target value that counts for nothing in the loss (HF's `-100`).
pub const IGNORE: i64 = -100;

/// The roles a chat message may have.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

// =============================================================================================
// Reading
// =============================================================================================

/// One training example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Example {
    /// Plain text: every next token is trained on.
    Text(String),
    /// Only the completion (and the EOS after it) is trained on.
    PromptCompletion { prompt: String, completion: String },
    /// A conversation: only the assistant answers are trained on.
    Chat(Vec<ChatMessage>),
}

impl Example {
    /// "text", "prompt/completion" or "chat".
    pub fn kind(&self) -> &'static str {
        match self {
            Example::Text(_) => "text",
            Example::PromptCompletion { .. } => "prompt/completion",
            Example::Chat(_) => "chat",
        }
    }
}

/// The examples of one file, with the 1-based line each came from (1 for a `.txt` file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFile {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub lines: Vec<usize>,
}

impl DataFile {
    /// The file name without its extension (`hamlet` for `plays/hamlet.txt`).
    pub fn stem(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

const SHAPES: &str = r#"{"text": string}, {"prompt": string, "completion": string}, {"messages": [{"role": "system"|"user"|"assistant", "content": string}, ...]} {"query": string, "choices": [string, ...], "gold": int} or {"contexts": [string, ...], "continuation": string, "gold": int}"#;

/// The multiple-choice line shapes, for error messages.
pub const MC_SHAPE: &str = r#"{"query": string, "choices": [string, ...], "gold": int (0-based index into choices)} or, scored partially, {"contexts": [string, ...], "continuation": string, "gold": int}"#;

/// One multiple-choice question. Two forms, as lm-evaluation-harness has them:
/// - `continuation: None`: the answer `choices[gold]` continues `query`; choice `i` is scored as
///   the continuation `" " + choices[i]` after `query`.
/// - `continuation: Some(c)` (*partial* scoring, WinoGrande's): `choices` are alternative
///   contexts (`query` is empty) and each is scored on the one shared continuation `" " + c`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McItem {
    pub query: String,
    pub choices: Vec<String>,
    pub gold: usize,
    pub continuation: Option<String>,
    /// The 1-based line it came from (0 when not from a file).
    pub line: usize,
}

impl McItem {
    /// Choice `i` as `(context, continuation)` before the whitespace move of
    /// [`crate::train::eval::encode_pair`].
    pub fn pair(&self, i: usize) -> (&str, String) {
        match &self.continuation {
            None => (&self.query, format!(" {}", self.choices[i])),
            Some(c) => (&self.choices[i], format!(" {c}")),
        }
    }

    /// The training example: prompt = the gold choice's context without its trailing
    /// whitespace, completion = that whitespace + its continuation (the context/continuation
    /// split of evaluation, so the loss counts exactly the tokens evaluation scores).
    pub fn to_example(&self) -> Example {
        let (context, continuation) = self.pair(self.gold);
        let trimmed = context.trim_end();
        let completion = format!("{}{continuation}", &context[trimmed.len()..]);
        Example::PromptCompletion { prompt: trimmed.to_string(), completion }
    }
}

/// A multiple-choice object (either form of [`McItem`]) to an [`McItem`] (`line` 0), or what is
/// wrong with it: a missing or non-string `query`, `choices`/`contexts` missing, empty or not all
/// strings, a missing or blank `continuation`, the two forms mixed, `gold` missing, not a
/// non-negative integer, or out of range.
pub fn parse_mc(obj: &serde_json::Map<String, Value>) -> std::result::Result<McItem, String> {
    if obj.contains_key("contexts") || obj.contains_key("continuation") {
        return parse_partial_mc(obj);
    }
    let query = match obj.get("query") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(format!("\"query\" must be a string, got {} (expected {MC_SHAPE})", json_kind(v))),
        None => return Err(format!("missing \"query\" (expected {MC_SHAPE})")),
    };
    let choices = string_list(obj, "choices")?;
    let gold = parse_gold(obj, choices.len())?;
    Ok(McItem { query, choices, gold, continuation: None, line: 0 })
}

/// `{"contexts": [string, ...], "continuation": string, "gold": int}` (no `query`, no `choices`).
fn parse_partial_mc(obj: &serde_json::Map<String, Value>) -> std::result::Result<McItem, String> {
    if let Some(k) = ["query", "choices"].into_iter().find(|k| obj.contains_key(*k)) {
        return Err(format!("\"{k}\" and \"contexts\"/\"continuation\" do not go together (expected {MC_SHAPE})"));
    }
    let contexts = string_list(obj, "contexts")?;
    let continuation = match obj.get("continuation") {
        Some(Value::String(s)) if s.trim().is_empty() => return Err("\"continuation\" is empty: it is what every context is scored on".into()),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(format!("\"continuation\" must be a string, got {} (expected {MC_SHAPE})", json_kind(v))),
        None => return Err(format!("missing \"continuation\" (expected {MC_SHAPE})")),
    };
    let gold = parse_gold(obj, contexts.len())?;
    Ok(McItem { query: String::new(), choices: contexts, gold, continuation: Some(continuation), line: 0 })
}

/// A non-empty array of strings under `key`.
fn string_list(obj: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    match obj.get(key) {
        Some(Value::Array(a)) if a.is_empty() => Err(format!("\"{key}\" is empty; expected at least one answer (expected {MC_SHAPE})")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::String(s) => Ok(s.clone()),
                v => Err(format!("{key}[{i}] must be a string, got {}", json_kind(v))),
            })
            .collect(),
        Some(v) => Err(format!("\"{key}\" must be an array of strings, got {} (expected {MC_SHAPE})", json_kind(v))),
        None => Err(format!("missing \"{key}\" (expected {MC_SHAPE})")),
    }
}

/// `gold`: a 0-based index below `n`.
fn parse_gold(obj: &serde_json::Map<String, Value>, n: usize) -> std::result::Result<usize, String> {
    match obj.get("gold") {
        Some(Value::Number(v)) => match v.as_u64() {
            Some(g) if (g as usize) < n => Ok(g as usize),
            Some(g) => Err(format!("\"gold\" is {g}, out of range for {n} choices (0-based: 0..={})", n - 1)),
            None => Err(format!("\"gold\" must be a non-negative integer index into choices, got {v}")),
        },
        Some(v) => Err(format!("\"gold\" must be an integer index into choices, got {}", json_kind(v))),
        None => Err(format!("missing \"gold\" (the index of the right answer; expected {MC_SHAPE})")),
    }
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"))
}

fn is_txt(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"))
}

/// A file's text (a leading BOM dropped). Not UTF-8: an error naming the line and byte offset.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Format { path: path.to_path_buf(), msg: format!("line {line}: not valid UTF-8 (first bad byte at offset {at}); convert the file to UTF-8") }
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Reads one file: `.jsonl`/`.json` (one example per line) or `.txt` (one text example).
pub fn read_file(path: &Path) -> Result<DataFile> {
    let text = read_text(path)?;
    if is_txt(path) {
        return Ok(DataFile { path: path.to_path_buf(), examples: vec![Example::Text(text)], lines: vec![1] });
    }
    if !is_jsonl(path) {
        return Err(Error::Format { path: path.to_path_buf(), msg: "expected a .jsonl (or .json, one object per line) or .txt file".into() });
    }
    let (examples, lines) = parse_jsonl(&text, path)?;
    Ok(DataFile { path: path.to_path_buf(), examples, lines })
}

/// Reads a `.jsonl`/`.txt` file, or every `.jsonl`, `.json` and `.txt` file directly inside a
/// folder (sorted by file name; other files and subfolders are ignored). An error if there is no
/// example at all.
pub fn read_files(path: &Path) -> Result<Vec<DataFile>> {
    let files = if path.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let mut paths = Vec::new();
        for entry in rd {
            let p = entry.map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?.path();
            if p.is_file() && (is_jsonl(&p) || is_txt(&p)) {
                paths.push(p);
            }
        }
        paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        if paths.is_empty() {
            return Err(Error::Format { path: path.to_path_buf(), msg: "the folder holds no .jsonl, .json or .txt file".into() });
        }
        paths.iter().map(|p| read_file(p)).collect::<Result<Vec<_>>>()?
    } else if path.exists() {
        vec![read_file(path)?]
    } else {
        return Err(Error::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder") });
    };
    if files.iter().all(|f| f.examples.is_empty()) {
        return Err(Error::Format { path: path.to_path_buf(), msg: "no examples (every line is blank)".into() });
    }
    Ok(files)
}

/// The examples of [`read_files`], all files concatenated.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    Ok(read_files(path)?.into_iter().flat_map(|f| f.examples).collect())
}

/// Parses JSONL text (`path` names it in errors). Returns the examples and their 1-based lines.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<(Vec<Example>, Vec<usize>)> {
    let mut examples = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let ex = parse_line(line).map_err(|msg| Error::Format { path: path.to_path_buf(), msg: format!("line {n}: {msg}") })?;
        examples.push(ex);
        lines.push(n);
    }
    Ok((examples, lines))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str, at: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("{at}\"{key}\" must be a string, got {}", json_kind(v))),
        None => Err(format!("{at}missing \"{key}\" (expected {SHAPES})")),
    }
}

/// One JSONL line to an example, or what is wrong with it.
fn parse_line(line: &str) -> std::result::Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON at column {}: {e}; expected {SHAPES}", e.column()))?;
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object ({SHAPES}), got {}", json_kind(&v)));
    };
    let has = |k: &str| obj.contains_key(k);
    let shapes = [
        has("text"),
        has("prompt") || has("completion"),
        has("messages"),
        has("query") || has("choices") || has("gold") || has("contexts") || has("continuation"),
    ];
    match shapes.iter().filter(|&&s| s).count() {
        0 => {
            let keys: Vec<&String> = obj.keys().collect();
            return Err(format!("expected {SHAPES}, got an object with keys {keys:?}"));
        }
        1 => {}
        _ => {
            return Err(format!(
                "ambiguous example: use exactly one of \"text\", \"prompt\"/\"completion\", \"messages\" or \"query\"/\"choices\"/\"gold\" (expected {SHAPES})"
            ))
        }
    }
    if shapes[3] {
        return Ok(parse_mc(&obj)?.to_example());
    }
    if shapes[0] {
        return Ok(Example::Text(string_field(&obj, "text", "")?));
    }
    if shapes[1] {
        let prompt = string_field(&obj, "prompt", "")?;
        let completion = string_field(&obj, "completion", "")?;
        return Ok(Example::PromptCompletion { prompt, completion });
    }
    let msgs = match &obj["messages"] {
        Value::Array(a) => a,
        other => return Err(format!("\"messages\" must be an array of {{\"role\", \"content\"}} objects, got {}", json_kind(other))),
    };
    if msgs.is_empty() {
        return Err("\"messages\" is empty; expected at least one user and one assistant message".into());
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (j, m) in msgs.iter().enumerate() {
        let at = format!("messages[{j}]: ");
        let Value::Object(m) = m else {
            return Err(format!("{at}expected an object {{\"role\": string, \"content\": string}}, got {}", json_kind(m)));
        };
        let role = string_field(m, "role", &at)?;
        if !ROLES.contains(&role.as_str()) {
            return Err(format!("{at}unknown role {role:?}; expected \"system\", \"user\" or \"assistant\""));
        }
        let content = string_field(m, "content", &at)?;
        out.push(ChatMessage { role, content });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("\"messages\" has no assistant message, so there is nothing to train on".into());
    }
    Ok(Example::Chat(out))
}

// =============================================================================================
// Tokenizing
// =============================================================================================

/// A tokenized training sequence: `targets[i]` is the token to predict at position `i`
/// ([`IGNORE`] = not counted). `ids.len() == targets.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<i64>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The number of counted targets.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// How examples become sequences.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// The longest sequence (tokens per window / per example).
    pub seq_len: usize,
    /// Append the tokenizer's EOS to each text example (default true), so a model learns where
    /// a document ends and packed documents are separated. Prompt/completion examples always end
    /// with EOS; chat examples end as the template ends them.
    pub add_eos: bool,
}

impl TokenizeOptions {
    pub fn new(seq_len: usize) -> Self {
        TokenizeOptions { seq_len, add_eos: true }
    }
}

/// What tokenization did, to report to the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizeStats {
    pub examples: usize,
    /// Sequences produced (windows count one each).
    pub sequences: usize,
    /// Tokens in the sequences.
    pub tokens: usize,
    /// Counted targets in the sequences.
    pub counted: usize,
    /// Text examples longer than `seq_len`, cut into several windows (no token lost).
    pub windowed: usize,
    /// Prompt/completion and chat examples longer than `seq_len`, truncated at the end.
    pub truncated: usize,
    /// Examples (or a truncated example's remainder) with no counted target, dropped: an empty
    /// text, or a prompt that fills all of `seq_len`.
    pub dropped: usize,
}

impl fmt::Display for TokenizeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} examples -> {} sequences, {} tokens ({} trained on)", self.examples, self.sequences, self.tokens, self.counted)?;
        if self.windowed > 0 {
            write!(f, "; {} long texts cut into windows", self.windowed)?;
        }
        if self.truncated > 0 {
            write!(f, "; {} examples truncated to the sequence length", self.truncated)?;
        }
        if self.dropped > 0 {
            write!(f, "; {} examples dropped (nothing to train on)", self.dropped)?;
        }
        Ok(())
    }
}

/// Sequences and what it took to make them.
#[derive(Clone, Debug, Default)]
pub struct Tokenized {
    pub sequences: Vec<Sequence>,
    pub stats: TokenizeStats,
}

/// What happened to one example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It fits in one sequence.
    Whole,
    /// A text cut into this many windows.
    Windowed(usize),
    /// Truncated at the end to `seq_len` tokens.
    Truncated,
    /// Nothing to train on: no sequence.
    Dropped,
}

/// Next-token targets over `ids`: `ids[i + 1]` where `counted(i + 1)`, else [`IGNORE`]; the last
/// position is never counted.
fn next_targets(ids: &[u32], counted: impl Fn(usize) -> bool) -> Vec<i64> {
    let n = ids.len();
    (0..n).map(|i| if i + 1 < n && counted(i + 1) { ids[i + 1] as i64 } else { IGNORE }).collect()
}

/// Tokenizes one example.
///
/// - [`Example::Text`]: `encode(text, true)` (the tokenizer's BOS where it adds one), then EOS
///   when `add_eos`; every next token counted. Longer than `seq_len`: consecutive windows of
///   `seq_len` whose last target is the first token of the next window, so every token but the
///   first is a target exactly once. A window with no counted target (the final EOS alone) is
///   dropped, since its one token was already the previous window's last target.
/// - [`Example::PromptCompletion`]: `encode(prompt, true)` followed by `encode(completion, false)`
///   and EOS. The two are tokenized apart, so no token straddles the boundary (a prompt ending in
///   a space keeps it); only the completion's tokens and the EOS are targets.
/// - [`Example::Chat`]: [`Tokenizer::render_chat_with_masks`]; only assistant-answer tokens (the
///   answer text and its end-of-turn) are targets.
///
/// Prompt/completion and chat sequences longer than `seq_len` keep their first `seq_len`
/// positions ([`Outcome::Truncated`]); the last one still predicts the token after it. One with
/// no counted target left is [`Outcome::Dropped`].
pub fn tokenize_example(tok: &Tokenizer, ex: &Example, opts: &TokenizeOptions) -> Result<(Vec<Sequence>, Outcome)> {
    if opts.seq_len == 0 {
        return Err(Error::invalid("data.tokenize", "seq_len must be at least 1"));
    }
    let s = opts.seq_len;
    let (ids, targets) = match ex {
        Example::Text(text) if text.is_empty() => return Ok((Vec::new(), Outcome::Dropped)),
        Example::Text(text) => {
            let mut ids = tok.encode(text, true)?;
            if opts.add_eos && !ids.is_empty() {
                if let Some(eos) = tok.eos_id() {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
            }
            let targets = next_targets(&ids, |_| true);
            let mut seqs = Vec::new();
            for (w_ids, w_t) in ids.chunks(s).zip(targets.chunks(s)) {
                if w_t.iter().any(|&t| t != IGNORE) {
                    seqs.push(Sequence { ids: w_ids.to_vec(), targets: w_t.to_vec() });
                }
            }
            let outcome = match seqs.len() {
                0 => Outcome::Dropped,
                1 if ids.len() <= s => Outcome::Whole,
                n => Outcome::Windowed(n),
            };
            return Ok((seqs, outcome));
        }
        Example::PromptCompletion { prompt, completion } => {
            let mut ids = tok.encode(prompt, true)?;
            let p = ids.len();
            ids.extend(tok.encode(completion, false)?);
            if let Some(eos) = tok.eos_id() {
                ids.push(eos);
            }
            let targets = next_targets(&ids, |i| i >= p);
            (ids, targets)
        }
        Example::Chat(msgs) => {
            let enc = tok.render_chat_with_masks(msgs)?;
            let targets = enc.targets();
            (enc.ids, targets)
        }
    };
    let truncated = ids.len() > s;
    let seq = Sequence { ids: ids[..ids.len().min(s)].to_vec(), targets: targets[..targets.len().min(s)].to_vec() };
    if seq.counted() == 0 {
        return Ok((Vec::new(), Outcome::Dropped));
    }
    Ok((vec![seq], if truncated { Outcome::Truncated } else { Outcome::Whole }))
}

fn collect(results: Vec<(Vec<Sequence>, Outcome)>) -> Tokenized {
    let mut out = Tokenized::default();
    out.stats.examples = results.len();
    for (seqs, outcome) in results {
        match outcome {
            Outcome::Whole => {}
            Outcome::Windowed(_) => out.stats.windowed += 1,
            Outcome::Truncated => out.stats.truncated += 1,
            Outcome::Dropped => out.stats.dropped += 1,
        }
        for s in seqs {
            out.stats.tokens += s.len();
            out.stats.counted += s.counted();
            out.sequences.push(s);
        }
    }
    out.stats.sequences = out.sequences.len();
    out
}

/// Tokenizes examples (in parallel; the order of the sequences is the examples' order). An error
/// names the index of the first example that fails.
pub fn tokenize(tok: &Tokenizer, examples: &[Example], opts: &TokenizeOptions) -> Result<Tokenized> {
    let results: Vec<Result<_>> = examples
        .par_iter()
        .enumerate()
        .map(|(i, ex)| tokenize_example(tok, ex, opts).map_err(|e| Error::invalid("data.tokenize", format!("example {i} ({}): {e}", ex.kind()))))
        .collect();
    Ok(collect(results.into_iter().collect::<Result<Vec<_>>>()?))
}

/// Tokenizes the examples of `files` in order. An error names the file and line (of the first
/// example that fails).
pub fn tokenize_files(tok: &Tokenizer, files: &[DataFile], opts: &TokenizeOptions) -> Result<Tokenized> {
    let items: Vec<(&DataFile, usize, &Example)> = files.iter().flat_map(|f| f.examples.iter().zip(&f.lines).map(move |(ex, &l)| (f, l, ex))).collect();
    let results: Vec<Result<_>> = items
        .par_iter()
        .map(|&(f, line, ex)| tokenize_example(tok, ex, opts).map_err(|e| Error::Format { path: f.path.clone(), msg: format!("line {line}: {e}") }))
        .collect();
    Ok(collect(results.into_iter().collect::<Result<Vec<_>>>()?))
}

// =============================================================================================
// Batching
// =============================================================================================

/// One batch for [`Decoder::loss`](crate::model::Decoder::loss): `b` rows of `t` tokens, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids [b·t].
    pub ids: Vec<u32>,
    /// Next-token targets [b·t], [`IGNORE`] where not counted (padding included).
    pub targets: Vec<i64>,
    /// [b·t], true = real token, false = padding; `None` when the batch has no padding.
    pub key_mask: Option<Vec<bool>>,
    pub b: usize,
    pub t: usize,
    /// The number of targets that are not [`IGNORE`].
    pub counted: usize,
}

impl Batch {
    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        match &self.key_mask {
            Some(m) => m.iter().filter(|&&x| x).count(),
            None => self.ids.len(),
        }
    }
}

/// How sequences are laid out in rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Sequences concatenated, in the epoch's order, and cut into rows of exactly `seq_len`
    /// (only the epoch's last row may be padded). A sequence cut by a row end continues at the
    /// start of the next row, and the last position of the first part predicts the first token
    /// of the rest, so no target is lost.
    ///
    /// There is no cross-document attention masking, as in most trainers' packing: a token may
    /// attend to the end of the previous document in its row. Targets never cross documents
    /// (the last position of a sequence is not counted), and text and prompt/completion
    /// sequences end with EOS, which marks the boundary for the model.
    Packed,
    /// One sequence per row, right-padded to the longest row of the batch with `pad_id`;
    /// `key_mask` is false and the target [`IGNORE`] on padding.
    Padded,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Packed => "packed",
            Layout::Padded => "padded",
        })
    }
}

/// How a [`Batcher`] builds batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Tokens per packed row; the longest sequence allowed in a padded row.
    pub seq_len: usize,
    pub layout: Layout,
    /// The id written on padding (any id inside the vocabulary: it is masked and never a target).
    pub pad_id: u32,
    /// Shuffle the sequences at the start of every epoch (else they keep their order).
    pub shuffle: bool,
    /// Skip an epoch's last batch when it has fewer than `batch_size` rows.
    pub drop_last: bool,
    /// Seeds the per-epoch shuffles.
    pub seed: u64,
}

/// Where a [`Batcher`] stands, to save in a checkpoint and [`Batcher::restore`] later.
///
/// The order of epoch `e` is a function of `seed` and `e` alone (a [`SplitMix`] seeded from
/// both), so the RNG state is `(seed, epoch)` and no generator needs saving; `row` is the
/// position inside the epoch. The layout, sequence length and a fingerprint of the sequences
/// let a resume over different data or settings fail with a clear message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    pub seed: u64,
    /// The epoch the next batch comes from (0-based).
    pub epoch: u64,
    /// Rows of that epoch already handed out.
    pub row: u64,
    /// Batches handed out since the start.
    pub batches: u64,
    pub layout: Layout,
    pub seq_len: usize,
    pub shuffle: bool,
    /// FNV-1a hash of the sequences (hex).
    pub fingerprint: String,
}

impl BatcherState {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("BatcherState serializes")
    }
    pub fn from_json(v: &Value) -> Result<BatcherState> {
        serde_json::from_value(v.clone()).map_err(|e| Error::invalid("batcher.restore", format!("not a saved batcher state: {e}")))
    }
}

/// A part of a row: `seqs[seq].{ids,targets}[from..to]`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    seq: usize,
    from: usize,
    to: usize,
}

type Row = Vec<Segment>;

/// Yields batches over a set of sequences, epoch after epoch, in a deterministic order.
pub struct Batcher {
    seqs: Vec<Sequence>,
    cfg: BatchConfig,
    fingerprint: String,
    epoch: u64,
    row: usize,
    batches: u64,
    /// The rows of `rows_epoch`.
    rows: Vec<Row>,
    rows_epoch: Option<u64>,
    rows_per_epoch: usize,
}

fn fingerprint(seqs: &[Sequence]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(seqs.len() as u64);
    for s in seqs {
        eat(s.ids.len() as u64);
        for (&i, &t) in s.ids.iter().zip(&s.targets) {
            eat(i as u64);
            eat(t as u64);
        }
    }
    format!("{h:016x}")
}

/// The order of the sequences in epoch `epoch`.
fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let key = SplitMix::new(epoch).next_u64();
        let mut rng = SplitMix::new(seed ^ key);
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

fn build_rows(seqs: &[Sequence], order: &[usize], layout: Layout, seq_len: usize) -> Vec<Row> {
    match layout {
        Layout::Padded => order.iter().map(|&s| vec![Segment { seq: s, from: 0, to: seqs[s].len() }]).collect(),
        Layout::Packed => {
            let mut rows = Vec::new();
            let mut cur: Row = Vec::new();
            let mut fill = 0;
            for &s in order {
                let len = seqs[s].len();
                let mut from = 0;
                while from < len {
                    let take = (len - from).min(seq_len - fill);
                    cur.push(Segment { seq: s, from, to: from + take });
                    fill += take;
                    from += take;
                    if fill == seq_len {
                        rows.push(std::mem::take(&mut cur));
                        fill = 0;
                    }
                }
            }
            if fill > 0 {
                rows.push(cur);
            }
            rows
        }
    }
}

impl Batcher {
    /// A batcher over `seqs`, positioned at the start of epoch 0. Errors: no sequences, an empty
    /// sequence, `ids`/`targets` lengths that differ, `batch_size` or `seq_len` of 0, a padded
    /// sequence longer than `seq_len`, or (with `drop_last`) fewer rows than one batch.
    pub fn new(seqs: Vec<Sequence>, cfg: BatchConfig) -> Result<Batcher> {
        const OP: &str = "batcher";
        crate::ensure!(cfg.batch_size > 0 && cfg.seq_len > 0, OP, "batch_size and seq_len must be at least 1 (got {} and {})", cfg.batch_size, cfg.seq_len);
        crate::ensure!(!seqs.is_empty(), OP, "no sequences to batch");
        for (i, s) in seqs.iter().enumerate() {
            crate::ensure!(!s.is_empty(), OP, "sequence {i} is empty");
            crate::ensure!(s.ids.len() == s.targets.len(), OP, "sequence {i} has {} ids but {} targets", s.ids.len(), s.targets.len());
            if cfg.layout == Layout::Padded {
                crate::ensure!(
                    s.len() <= cfg.seq_len,
                    OP,
                    "sequence {i} has {} tokens, more than seq_len {} (tokenize with the same seq_len)",
                    s.len(),
                    cfg.seq_len
                );
            }
        }
        let rows_per_epoch = match cfg.layout {
            Layout::Padded => seqs.len(),
            Layout::Packed => seqs.iter().map(Sequence::len).sum::<usize>().div_ceil(cfg.seq_len),
        };
        crate::ensure!(
            !cfg.drop_last || rows_per_epoch >= cfg.batch_size,
            OP,
            "an epoch has {rows_per_epoch} rows, fewer than one batch of {} (drop_last would yield nothing)",
            cfg.batch_size
        );
        let fingerprint = fingerprint(&seqs);
        Ok(Batcher { seqs, cfg, fingerprint, epoch: 0, row: 0, batches: 0, rows: Vec::new(), rows_epoch: None, rows_per_epoch })
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    pub fn sequences(&self) -> &[Sequence] {
        &self.seqs
    }

    /// Rows in every epoch (the same each epoch: shuffling changes only which tokens go where).
    pub fn rows_per_epoch(&self) -> usize {
        self.rows_per_epoch
    }

    /// Batches in every epoch (the last may be smaller unless `drop_last`).
    pub fn batches_per_epoch(&self) -> usize {
        if self.cfg.drop_last {
            self.rows_per_epoch / self.cfg.batch_size
        } else {
            self.rows_per_epoch.div_ceil(self.cfg.batch_size)
        }
    }

    /// The epoch the next batch comes from (after the last batch of epoch 0, this is 1).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counted targets in one epoch.
    pub fn counted_per_epoch(&self) -> usize {
        self.seqs.iter().map(Sequence::counted).sum()
    }

    fn ensure_rows(&mut self) {
        if self.rows_epoch != Some(self.epoch) {
            let order = epoch_order(self.seqs.len(), self.cfg.seed, self.epoch, self.cfg.shuffle);
            self.rows = build_rows(&self.seqs, &order, self.cfg.layout, self.cfg.seq_len);
            debug_assert_eq!(self.rows.len(), self.rows_per_epoch);
            self.rows_epoch = Some(self.epoch);
        }
    }

    /// The next batch; epochs follow one another without end (see [`Batcher::epoch`]).
    pub fn next_batch(&mut self) -> Batch {
        self.ensure_rows();
        let n = self.rows.len();
        let take = (n - self.row).min(self.cfg.batch_size);
        let batch = self.assemble(&self.rows[self.row..self.row + take]);
        self.row += take;
        self.batches += 1;
        let left = n - self.row;
        if left == 0 || (self.cfg.drop_last && left < self.cfg.batch_size) {
            self.epoch += 1;
            self.row = 0;
        }
        batch
    }

    /// The remaining batches of the current epoch (after which [`Batcher::epoch`] has advanced).
    pub fn rest_of_epoch(&mut self) -> Vec<Batch> {
        let e = self.epoch;
        let mut out = Vec::new();
        while self.epoch == e {
            out.push(self.next_batch());
        }
        out
    }

    fn assemble(&self, rows: &[Row]) -> Batch {
        let len = |r: &Row| r.iter().map(|s| s.to - s.from).sum::<usize>();
        let t = match self.cfg.layout {
            Layout::Packed => self.cfg.seq_len,
            Layout::Padded => rows.iter().map(len).max().unwrap_or(0),
        };
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for r in rows {
            for seg in r {
                let s = &self.seqs[seg.seq];
                ids.extend_from_slice(&s.ids[seg.from..seg.to]);
                targets.extend_from_slice(&s.targets[seg.from..seg.to]);
            }
            let real = len(r);
            mask.extend(std::iter::repeat(true).take(real));
            ids.extend(std::iter::repeat(self.cfg.pad_id).take(t - real));
            targets.extend(std::iter::repeat(IGNORE).take(t - real));
            mask.extend(std::iter::repeat(false).take(t - real));
        }
        let counted = targets.iter().filter(|&&x| x != IGNORE).count();
        let key_mask = if mask.iter().all(|&m| m) { None } else { Some(mask) };
        Batch { ids, targets, key_mask, b, t, counted }
    }

    /// Where the batcher stands; [`Batcher::restore`] continues from here bit-identically.
    pub fn state(&self) -> BatcherState {
        BatcherState {
            seed: self.cfg.seed,
            epoch: self.epoch,
            row: self.row as u64,
            batches: self.batches,
            layout: self.cfg.layout,
            seq_len: self.cfg.seq_len,
            shuffle: self.cfg.shuffle,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Continues from a saved state: the same sequences, layout and `seq_len` are required (the
    /// error says which differs); the seed comes from the state. The batch size may differ (the
    /// position is kept in rows), though batches then differ from the saved run's.
    pub fn restore(&mut self, state: &BatcherState) -> Result<()> {
        const OP: &str = "batcher.restore";
        crate::ensure!(
            state.fingerprint == self.fingerprint,
            OP,
            "the training data differs from the run being resumed (fingerprint {} now, {} saved): use the same data, tokenizer and seq_len",
            self.fingerprint,
            state.fingerprint
        );
        crate::ensure!(state.layout == self.cfg.layout, OP, "the saved run used {} rows, this one {}", state.layout, self.cfg.layout);
        crate::ensure!(state.seq_len == self.cfg.seq_len, OP, "the saved run used seq_len {}, this one {}", state.seq_len, self.cfg.seq_len);
        crate::ensure!(state.shuffle == self.cfg.shuffle, OP, "the saved run had shuffle = {}, this one {}", state.shuffle, self.cfg.shuffle);
        crate::ensure!((state.row as usize) < self.rows_per_epoch, OP, "saved position row {} is past the {} rows of an epoch", state.row, self.rows_per_epoch);
        self.cfg.seed = state.seed;
        self.epoch = state.epoch;
        self.row = state.row as usize;
        self.batches = state.batches;
        self.rows_epoch = None;
        Ok(())
    }
}

impl Iterator for Batcher {
    type Item = Batch;
    /// Never `None`: epochs repeat.
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// One pass over `seqs` in their order (no shuffle, last batch kept), for evaluation.
pub fn eval_batches(seqs: Vec<Sequence>, batch_size: usize, seq_len: usize, layout: Layout, pad_id: u32) -> Result<Vec<Batch>> {
    let cfg = BatchConfig { batch_size, seq_len, layout, pad_id, shuffle: false, drop_last: false, seed: 0 };
    Ok(Batcher::new(seqs, cfg)?.rest_of_epoch())
}

// =============================================================================================
// Held-out splits
// =============================================================================================

/// Splits `items` into (train, eval): `fraction` of them (rounded; at least one when the
/// fraction is not 0, and at least one left for training) chosen at random by `seed` for eval. Both parts keep the input order. Works on
/// [`Example`]s, or on [`DataFile`]s to hold out whole files.
/// Splits one plain-text document for `--eval-fraction`: the last `fraction` of its characters,
/// moved forward to the next line start, is held out (a contiguous tail, so no eval line sits
/// between training lines). Errors when either side would be empty.
pub fn split_text_tail(text: &str, fraction: f64) -> Result<(String, String)> {
    const OP: &str = "split_eval";
    crate::ensure!((0.0..1.0).contains(&fraction) && fraction > 0.0, OP, "the eval fraction must be in (0, 1), got {fraction}");
    let target = ((1.0 - fraction) * text.len() as f64) as usize;
    // The first line start at or after the target byte.
    let cut = text.char_indices().find(|&(i, c)| i >= target.saturating_sub(1) && c == '\n').map(|(i, _)| i + 1);
    match cut {
        Some(cut) if cut > 0 && cut < text.len() && !text[..cut].trim().is_empty() && !text[cut..].trim().is_empty() => {
            Ok((text[..cut].to_string(), text[cut..].to_string()))
        }
        _ => Err(crate::error::Error::invalid(
            OP,
            format!(
                "cannot hold out {:.0}% of a {}-byte text at a line boundary with text on both sides; give --eval-data or more lines",
                fraction * 100.0,
                text.len()
            ),
        )),
    }
}

/// `--eval-fraction` on a single file: a lone plain-text document loses its tail
/// ([`split_text_tail`]); a file of several examples loses a seeded `fraction` of them
/// ([`split_eval`]). Both sides keep their source line numbers (for error messages).
pub fn split_file_eval(file: DataFile, fraction: f64, seed: u64) -> Result<(DataFile, DataFile)> {
    let DataFile { path, examples, lines } = file;
    type Numbered = Vec<(Example, usize)>;
    let (tr, ev): (Numbered, Numbered) = match examples.as_slice() {
        [Example::Text(text)] => {
            let (a, b) = split_text_tail(text, fraction)?;
            let first = lines.first().copied().unwrap_or(1);
            let eval_line = first + a.matches('\n').count();
            (vec![(Example::Text(a), first)], vec![(Example::Text(b), eval_line)])
        }
        _ => split_eval(examples.into_iter().zip(lines).collect(), fraction, seed)?,
    };
    let mk = |items: Numbered| {
        let (examples, lines) = items.into_iter().unzip();
        DataFile { path: path.clone(), examples, lines }
    };
    Ok((mk(tr), mk(ev)))
}

pub fn split_eval<T>(items: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    let keys: Vec<usize> = (0..items.len()).collect();
    split_by_keys(items, keys, fraction, seed)
}

/// Like [`split_eval`], but items with the same `key` always land on the same side; `fraction`
/// is of the groups. E.g. two editions of one play (`hamlet_gut.txt`, `hamlet_gut_f.txt`) keyed
/// by play, so the held-out play is not also trained on.
pub fn split_eval_grouped<T, K: Ord + Clone>(items: Vec<T>, key: impl Fn(&T) -> K, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    let keys: Vec<K> = items.iter().map(key).collect();
    split_by_keys(items, keys, fraction, seed)
}

fn split_by_keys<T, K: Ord + Clone>(items: Vec<T>, keys: Vec<K>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "split_eval";
    crate::ensure!((0.0..1.0).contains(&fraction), OP, "the eval fraction must be in [0, 1), got {fraction}");
    if fraction == 0.0 {
        return Ok((items, Vec::new()));
    }
    let groups: Vec<K> = keys.iter().cloned().collect::<BTreeSet<K>>().into_iter().collect();
    let g = groups.len();
    crate::ensure!(g >= 2, OP, "cannot hold out a fraction of {g} item(s): at least 2 are needed, one for training and one for eval");
    let n_eval = ((fraction * g as f64).round() as usize).clamp(1, g - 1);
    let order = epoch_order(g, seed, u64::MAX, true);
    let eval: BTreeSet<&K> = order[..n_eval].iter().map(|&i| &groups[i]).collect();
    let mut train_part = Vec::new();
    let mut eval_part = Vec::new();
    for (item, k) in items.into_iter().zip(&keys) {
        if eval.contains(k) {
            eval_part.push(item);
        } else {
            train_part.push(item);
        }
    }
    Ok((train_part, eval_part))
}

/// Holds out the files named in `names` (each matched against the file name or its stem, e.g.
/// `"hamlet"` or `"hamlet.txt"`) as eval: returns (train, eval). An unknown name is an error
/// listing the files there are; so is holding out every file.
pub fn hold_out_files(files: Vec<DataFile>, names: &[&str]) -> Result<(Vec<DataFile>, Vec<DataFile>)> {
    const OP: &str = "hold_out_files";
    let name_of = |f: &DataFile| f.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut matched: BTreeMap<&str, bool> = names.iter().map(|&n| (n, false)).collect();
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for f in files {
        let (name, stem) = (name_of(&f), f.stem());
        let hit: Vec<&str> = names.iter().copied().filter(|&n| n == name || n == stem).collect();
        if hit.is_empty() {
            train.push(f);
        } else {
            for n in hit {
                matched.insert(n, true);
            }
            eval.push(f);
        }
    }
    let missing: Vec<&str> = matched.iter().filter(|(_, &m)| !m).map(|(&n, _)| n).collect();
    if !missing.is_empty() {
        let have: Vec<String> = train.iter().chain(&eval).map(name_of).collect();
        crate::bail!(OP, "no file named {missing:?}; the files are {have:?}");
    }
    crate::ensure!(!train.is_empty(), OP, "every file is held out; nothing is left for training");
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::{split_file_eval, split_text_tail, DataFile, Example};
    use std::path::PathBuf;

    #[test]
    fn one_file_eval_splits_keep_examples_and_line_numbers() {
        let text: String = (0..10).map(|i| format!("line {i}\n")).collect();
        let file = DataFile { path: PathBuf::from("a.txt"), examples: vec![Example::Text(text)], lines: vec![1] };
        let (tr, ev) = split_file_eval(file, 0.2, 7).unwrap();
        assert_eq!((tr.examples.len(), tr.lines.clone()), (1, vec![1]));
        assert_eq!((ev.examples.len(), ev.lines.clone()), (1, vec![9]));
        let examples: Vec<Example> = (0..10).map(|i| Example::Text(format!("doc {i}"))).collect();
        let file = DataFile { path: PathBuf::from("a.jsonl"), examples, lines: (1..=10).collect() };
        let (tr, ev) = split_file_eval(file, 0.3, 7).unwrap();
        assert_eq!((tr.examples.len(), ev.examples.len()), (7, 3));
        assert_eq!((tr.lines.len(), ev.lines.len()), (7, 3));
        // Each example keeps its own line: "doc i" came from line i + 1.
        for f in [&tr, &ev] {
            for (ex, l) in f.examples.iter().zip(&f.lines) {
                let Example::Text(t) = ex else { unreachable!() };
                assert_eq!(t, &format!("doc {}", l - 1));
            }
        }
    }

    #[test]
    fn a_single_text_splits_at_a_line_start() {
        let text: String = (0..10).map(|i| format!("line {i}\n")).collect();
        let (tr, ev) = split_text_tail(&text, 0.2).unwrap();
        assert_eq!(format!("{tr}{ev}"), text);
        assert!(tr.ends_with('\n') && ev.starts_with("line "), "{tr:?} | {ev:?}");
        assert_eq!(ev.lines().count(), 2);
        // One line cannot be split; nor can a tail of blank lines.
        assert!(split_text_tail("just one line", 0.5).is_err());
        assert!(split_text_tail("text\n\n\n", 0.5).is_err());
        assert!(split_text_tail(&text, 0.0).is_err());
    }
}
