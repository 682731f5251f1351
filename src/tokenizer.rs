//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, or one rebuilt from GGUF
//! metadata (byte-level BPE or SentencePiece); chat templates rendered with minijinja.
//!
//! - [`Tokenizer::from_file`] reads a HF `tokenizer.json` and, when present beside it,
//!   `tokenizer_config.json` (chat template, BOS/EOS names, `add_bos_token`),
//!   `special_tokens_map.json` and `chat_template.jinja`.
//! - [`Tokenizer::from_gguf`] rebuilds the tokenizer a GGUF file describes from its
//!   [`GgufVocab`] (`tokenizer.ggml.*` metadata): byte-level BPE (`tokenizer.ggml.model = "gpt2"`)
//!   with the pre-tokenizer `tokenizer.ggml.pre` names, or SentencePiece (`"llama"`), encoded
//!   exactly as llama.cpp does (piece scores, byte fallback, `add_space_prefix`).
//! - [`Tokenizer::apply_chat_template`] renders the model's Jinja chat template the way
//!   transformers does (trim_blocks, lstrip_blocks, `raise_exception`, the Python string and dict
//!   methods templates call). A model without a template gets ChatML.
//! - [`Tokenizer::render_chat_with_masks`] tokenizes a conversation and flags the tokens that
//!   belong to assistant answers, so a trainer takes the loss on answers only
//!   ([`ChatEncoding::targets`]).
//!
//! ```
//! use spectune::tokenizer::{ChatMessage, GgufVocab, Tokenizer};
//!
//! // A tiny byte-level vocabulary: every byte symbol, two merges, two control tokens.
//! let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
//! let mut token_types = vec![3, 3];
//! for b in 0u8..=255 {
//!     tokens.push(spectune::tokenizer::byte_to_unicode(b).to_string());
//!     token_types.push(1);
//! }
//! tokens.push("hi".into());
//! tokens.push("Ġhi".into());
//! token_types.extend([1, 1]);
//! let vocab = GgufVocab {
//!     model: "gpt2".into(),
//!     pre: Some("gpt2".into()),
//!     tokens,
//!     merges: vec!["h i".into(), "Ġ hi".into()],
//!     token_types,
//!     eos_id: Some(1),
//!     ..GgufVocab::default()
//! };
//! let tok = Tokenizer::from_gguf(&vocab)?;
//! let ids = tok.encode("<|im_start|>hi hi", false)?;
//! assert_eq!(ids, vec![0, 258, 259]);
//! assert_eq!(tok.decode(&ids, true)?, "hi hi");
//! assert_eq!(tok.stop_ids(), &[1]);
//!
//! // No template in this vocabulary: ChatML.
//! let chat = [ChatMessage::user("hi")];
//! let text = tok.apply_chat_template(&chat, true)?;
//! assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
//! # Ok::<(), spectune::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// The tokenizer fields a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer name (e.g. "smollm", "llama-bpe", "qwen2").
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`, "a b" pairs in priority order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.scores`, indexed by id: SentencePiece piece scores (higher merges first).
    /// Empty for BPE vocabularies.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: prepend a space to the text; default true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
    /// `general.name`: llama.cpp sets per-model token attributes by it (Phi-3's special tokens
    /// strip the whitespace after them).
    pub model_name: Option<String>,
}

/// Token texts llama.cpp treats as control tokens whatever their stored type (end-of-generation,
/// end-of-turn and fill-in-the-middle markers that converters sometimes store as normal tokens;
/// llama.cpp warns "control-looking token … its type will be overridden").
const CONTROL_LOOKING: [&str; 47] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|eom_id|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "</s>",
    "[EOS]",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<reponame>",
];

impl GgufVocab {
    /// The type of token `id` as llama.cpp uses it: the stored `token_type` (normal where
    /// missing), except that a control-looking text (an end-of-turn or fill-in-the-middle marker
    /// llama.cpp knows by name) is a control token.
    pub fn token_type(&self, id: usize) -> i32 {
        let ty = self.token_types.get(id).copied().unwrap_or(1);
        if ty != TOKEN_TYPE_CONTROL && CONTROL_LOOKING.contains(&self.tokens[id].as_str()) {
            return TOKEN_TYPE_CONTROL;
        }
        ty
    }

    /// (lstrip, rstrip) of token `id` as llama.cpp sets them by model: a special token with
    /// rstrip swallows the whitespace after it in the text, lstrip the whitespace before it.
    /// Phi-3 (`general.name` containing "phi-3" or "phi3"): every unknown, control and
    /// user-defined token and `</s>` strip right, except `<unk>`, `<s>` and `<|endoftext|>`;
    /// Jina v2 (`pre` jina-v2-de/-es/-code): `<mask>` strips left.
    pub fn strip_attrs(&self, id: usize) -> (bool, bool) {
        let tok = self.tokens[id].as_str();
        let name = self.model_name.as_deref().unwrap_or("").to_lowercase();
        if matches!(self.pre.as_deref(), Some("jina-v2-de" | "jina-v2-es" | "jina-v2-code")) {
            return (tok == "<mask>", false);
        }
        if name.contains("phi-3") || name.contains("phi3") {
            let ty = self.token_type(id);
            let special = matches!(ty, TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED) || tok == "</s>";
            return (false, special && !matches!(tok, "<unk>" | "<s>" | "<|endoftext|>"));
        }
        (false, false)
    }
}

/// C's `isspace` (what llama.cpp strips next to a token with lstrip/rstrip).
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// GGUF `token_type` of the unknown token (`<unk>`).
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`): an added special token.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` of a user-defined token (`<think>`): an added, non-special token.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Tokens that end a turn in the common chat formats: [`Tokenizer::stop_ids`] holds the EOS id and
/// the ids of those present in the vocabulary.
pub const END_OF_TURN_TOKENS: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

/// The template used when a model carries none: ChatML, as SmolLM2, Qwen2 and many others use it.
///
/// Each message renders as `<|im_start|>{role}\n{content}<|im_end|>\n`; with the generation
/// prompt, `<|im_start|>assistant\n` follows.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message: `role` is "system", "user" or "assistant" (templates may accept others).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenized conversation with a per-token flag "is part of an assistant answer".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatEncoding {
    /// The rendered conversation (no generation prompt).
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// `assistant_mask[t]` is true when token `t` belongs to an assistant answer: the answer's
    /// text and the template's end-of-turn after it (e.g. `<|im_end|>`), not the whitespace that
    /// follows that and not the role header before it.
    pub assistant_mask: Vec<bool>,
}

impl ChatEncoding {
    /// Next-token targets for causal-LM training over `ids`: `targets[t] = ids[t + 1]` when token
    /// `t + 1` is an answer token, else -100 (ignored); the last position is always -100.
    pub fn targets(&self) -> Vec<i64> {
        let n = self.ids.len();
        (0..n).map(|t| if t + 1 < n && self.assistant_mask[t + 1] { self.ids[t + 1] as i64 } else { -100 }).collect()
    }

    /// The number of answer tokens (the tokens [`ChatEncoding::targets`] trains on).
    pub fn num_answer_tokens(&self) -> usize {
        self.assistant_mask.iter().filter(|&&m| m).count()
    }
}

/// A text tokenizer with the model's special tokens and chat template.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages (the file path, or "GGUF vocabulary").
    source: String,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    /// Named special tokens passed to the chat template (`bos_token`, `eos_token`, …).
    special_tokens: BTreeMap<String, String>,
    stop_ids: Vec<u32>,
    /// The number of ids (for GGUF: the number of tokens in the file, duplicates included).
    vocab_size: usize,
    chat_template: Option<String>,
    /// The compiled chat template (the model's, or ChatML).
    env: Arc<Environment<'static>>,
    /// SentencePiece vocabularies: the llama.cpp-exact encoder that `encode` uses (`inner` then
    /// serves decoding, id lookups and the exported `tokenizer.json`).
    spm: Option<Arc<Spm>>,
    /// The EOS id `encode(…, true)` appends (`tokenizer.ggml.add_eos_token`).
    append_eos: Option<u32>,
}

const CHAT: &str = "chat";

impl Tokenizer {
    /// Reads a HF `tokenizer.json` (or a folder holding one) and, beside it, the optional
    /// `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `unk_token`,
    /// `pad_token`, `add_bos_token`), `special_tokens_map.json` (token names missing from the
    /// config) and `chat_template.jinja` / `chat_template.json` (the template, where newer
    /// transformers saves it).
    ///
    /// The post-processor in `tokenizer.json` decides what `encode(…, true)` adds; only when the
    /// file has none and the config says `add_bos_token: true` is a BOS-prepending one installed.
    /// The file's truncation and padding settings are dropped. Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("tokenizer.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
        let mut inner: tokenizers::Tokenizer =
            text.parse().map_err(|e| Error::Format { path: path.clone(), msg: format!("not a valid HF tokenizer.json: {e}") })?;
        // Lengths are the caller's business (as in transformers' `encode`): no truncation or
        // padding from the file.
        inner.with_truncation(None).map_err(|e| Error::Format { path: path.clone(), msg: format!("cannot clear the truncation: {e}") })?;
        inner.with_padding(None);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));

        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
        let mut special_tokens = BTreeMap::new();
        for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let from = |j: &Option<serde_json::Value>| j.as_ref().and_then(|j| token_name(j.get(name)?));
            if let Some(t) = from(&config).or_else(|| from(&special_map)) {
                special_tokens.insert(name.to_string(), t);
            }
        }

        let cfg_path = dir.join("tokenizer_config.json");
        let mut chat_template = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(t) => Some(
                template_from_json(t)
                    .ok_or_else(|| Error::Format { path: cfg_path.clone(), msg: "chat_template is neither a string nor a list of {name, template}".into() })?,
            ),
        };
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::Io { path: jinja, source: e })?);
            }
        }
        if chat_template.is_none() {
            let json_path = dir.join("chat_template.json");
            if let Some(j) = read_json_opt(&json_path)? {
                chat_template = j.get("chat_template").and_then(template_from_json);
            }
        }

        let bos = named_id(&inner, special_tokens.get("bos_token"));
        let eos = named_id(&inner, special_tokens.get("eos_token"));
        let add_bos = config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false);
        if add_bos && inner.get_post_processor().is_none() {
            if let Some((name, id)) = &bos {
                let pp = bos_processor(name, *id).map_err(|msg| Error::Format { path: path.clone(), msg })?;
                inner.with_post_processor(Some(pp));
            }
        }
        let n = inner.get_vocab_size(true);
        Self::assemble(inner, path.display().to_string(), n, bos, eos, special_tokens, chat_template)
    }

    /// Rebuilds the tokenizer a GGUF file describes.
    ///
    /// `model = "gpt2"`: a byte-level BPE from `tokens` (id = index) and `merges` (priority =
    /// order), with the ByteLevel decoder. Tokens of type 3 (control) become special added tokens
    /// and of type 4 (user-defined) non-special added tokens, so `"<|im_start|>"` in the text
    /// encodes to its one id. `add_bos` installs a BOS-prepending post-processor.
    ///
    /// The pre-tokenizer follows `pre` (the names llama.cpp's converter writes):
    /// - "smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva": each digit
    ///   split off alone, then the GPT-2 regex (HF: `Digits(individual_digits)` then
    ///   `ByteLevel(add_prefix_space=false, use_regex=true)`, the SmolLM2 tokenizer.json);
    /// - "llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral": the Llama-3
    ///   split (`\p{N}{1,3}` digit groups, case-insensitive contractions);
    /// - "qwen2", "deepseek-r1-qwen", "megrez": the Qwen2 split (single digits) after NFC, as Qwen2's
    ///   tokenizer.json has it;
    /// - "gpt2", "default", no `pre`, and any name not listed: the GPT-2 regex byte-level split
    ///   (`ByteLevel(add_prefix_space=false, use_regex=true)`), which is what transformers does for
    ///   the names it does not know either. A model whose pre-tokenizer differs may then encode
    ///   some strings differently from its original tokenizer.
    ///
    /// The Llama-3 names also emit a pre-token that is itself a vocabulary entry without merging
    /// (`ignore_merges`, as llama.cpp and the HF file do), and default `add_bos` to true.
    ///
    /// `model = "llama"` (SentencePiece): llama.cpp's algorithm (see `Spm` in the source): special
    /// tokens split off, a space prefix (`add_space_prefix`, default true) and `▁` for spaces,
    /// then the adjacent pair whose concatenation is the highest-scoring piece merges until none
    /// does; characters outside the vocabulary fall back to `<0xXX>` byte tokens. `add_bos`
    /// defaults to true. Decoding uses an HF-style twin (BPE with merges derived from the scores,
    /// byte fallback), which is also what [`Tokenizer::inner`] returns.
    ///
    /// `add_eos` makes `encode(…, true)` append EOS. Any other model is an error.
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Tokenizer> {
        const OP: &str = "tokenizer.from_gguf";
        let n = vocab.tokens.len();
        crate::ensure!(n > 0, OP, "the vocabulary has no tokens (tokenizer.ggml.tokens is empty)");
        crate::ensure!(
            vocab.token_types.is_empty() || vocab.token_types.len() == n,
            OP,
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
            vocab.token_types.len()
        );
        for (what, id) in [("bos", vocab.bos_id), ("eos", vocab.eos_id), ("pad", vocab.pad_id), ("unk", vocab.unk_id)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(Error::OutOfRange { op: OP, what, index: id as i64, size: n });
                }
            }
        }
        match vocab.model.as_str() {
            "gpt2" => {}
            "llama" => return Self::from_gguf_spm(vocab),
            other => crate::bail!(OP, "tokenizer.ggml.model = {other:?} is not supported (only \"gpt2\", byte-level BPE, and \"llama\", SentencePiece)"),
        }
        let ttype = |i: usize| vocab.token_type(i);
        let is_added = |i: usize| matches!(ttype(i), TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED);

        // The BPE vocabulary is spelled in the byte alphabet. llama.cpp stores normal tokens that
        // way already; one that is not (a raw-text token) is respelled from its UTF-8 bytes. Added
        // tokens keep their text, which is what the added-token matcher looks for. A string that
        // occurs twice encodes to its last id (as in llama.cpp and transformers); the earlier id
        // still counts in `vocab_size` but decodes to nothing.
        let mut map = tokenizers::models::bpe::Vocab::default();
        for (i, t) in vocab.tokens.iter().enumerate() {
            let key = if is_added(i) || t.chars().all(|c| unicode_to_byte(c).is_some()) { t.clone() } else { to_byte_level(t) };
            map.insert(key, i as u32);
        }
        let mut merges = Vec::with_capacity(vocab.merges.len());
        for (r, m) in vocab.merges.iter().enumerate() {
            match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => merges.push((a.to_string(), b.to_string())),
                _ => crate::bail!(OP, "merge {r} ({m:?}) is not two tokens separated by one space"),
            }
        }
        let pre = vocab.pre.as_deref().unwrap_or("default");
        // llama.cpp (and the HF Llama-3 tokenizer.json) emit a pre-token that is a whole
        // vocabulary entry as that entry, without running the merges.
        let ignore_merges = LLAMA3_NAMES.contains(&pre);
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| Error::invalid(OP, format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let (pre_tok, nfc) = pre_tokenizer_for(pre).map_err(|e| Error::invalid(OP, e))?;
        inner.with_pre_tokenizer(Some(pre_tok));
        if nfc {
            inner.with_normalizer(Some(NFC));
        }
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));

        add_vocab_tokens(&mut inner, vocab, |ty| ty == TOKEN_TYPE_CONTROL);

        let named = |id: Option<u32>| id.map(|id| (vocab.tokens[id as usize].clone(), id));
        let (bos, eos) = (named(vocab.bos_id), named(vocab.eos_id));
        // llama.cpp's default when the key is missing: true for the Llama-3 family, else false.
        if vocab.add_bos.unwrap_or(ignore_merges) {
            let (name, id) = bos.clone().ok_or_else(|| Error::invalid(OP, "add_bos_token is true but the file names no BOS token"))?;
            inner.with_post_processor(Some(bos_processor(&name, id).map_err(|e| Error::invalid(OP, e))?));
        } else {
            inner.with_post_processor(Some(ByteLevel::new(false, true, true)));
        }
        let mut special_tokens = BTreeMap::new();
        for (name, id) in [("bos_token", vocab.bos_id), ("eos_token", vocab.eos_id), ("unk_token", vocab.unk_id), ("pad_token", vocab.pad_id)] {
            if let Some(id) = id {
                special_tokens.insert(name.to_string(), vocab.tokens[id as usize].clone());
            }
        }
        let mut tok = Self::assemble(inner, "GGUF vocabulary".into(), n, bos, eos, special_tokens, vocab.chat_template.clone())?;
        tok.append_eos = Self::eos_to_append(vocab)?;
        Ok(tok)
    }

    fn eos_to_append(vocab: &GgufVocab) -> Result<Option<u32>> {
        if !vocab.add_eos.unwrap_or(false) {
            return Ok(None);
        }
        vocab.eos_id.map(Some).ok_or_else(|| Error::invalid("tokenizer.from_gguf", "add_eos_token is true but the file names no EOS token"))
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`): pieces with `scores`, byte
    /// fallback through the `<0xXX>` tokens, spaces written as `▁`.
    fn from_gguf_spm(vocab: &GgufVocab) -> Result<Tokenizer> {
        const OP: &str = "tokenizer.from_gguf";
        let n = vocab.tokens.len();
        crate::ensure!(
            vocab.scores.len() == n,
            OP,
            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n} (a SentencePiece vocabulary needs one score per token)",
            vocab.scores.len()
        );
        if let Some(i) = vocab.scores.iter().position(|s| !s.is_finite()) {
            crate::bail!(OP, "tokenizer.ggml.scores[{i}] = {} is not finite", vocab.scores[i]);
        }
        let ttype = |i: usize| vocab.token_types.get(i).copied().unwrap_or(1);
        let add_bos = vocab.add_bos.unwrap_or(true);
        crate::ensure!(!add_bos || vocab.bos_id.is_some(), OP, "add_bos_token is true (the SentencePiece default) but the file names no BOS token");
        let spm = Spm::new(vocab, add_bos);

        // The `tokenizers` twin (decoding, id lookups, an exported tokenizer.json): HF's
        // SentencePiece-BPE layout, merges derived from the scores (a pair merges when their
        // concatenation is a piece; a higher piece score merges first).
        let mut map = tokenizers::models::bpe::Vocab::default();
        for (i, t) in vocab.tokens.iter().enumerate() {
            map.insert(t.clone(), i as u32);
        }
        let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
        for (i, t) in vocab.tokens.iter().enumerate() {
            if ttype(i) != 1 {
                continue;
            }
            for (k, _) in t.char_indices().skip(1) {
                let (a, b) = t.split_at(k);
                if map.contains_key(a) && map.contains_key(b) {
                    merges.push((vocab.scores[i], i as u32, a.to_string(), b.to_string()));
                }
            }
        }
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
        let mut builder = BPE::builder().vocab_and_merges(map, merges).byte_fallback(true).fuse_unk(true);
        if let Some(u) = vocab.unk_id {
            builder = builder.unk_token(vocab.tokens[u as usize].clone());
        }
        let bpe = builder.build().map_err(|e| Error::invalid(OP, format!("cannot build the SentencePiece twin: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace_space = tokenizers::normalizers::Replace::new(" ", "\u{2581}").map_err(|e| Error::invalid(OP, e.to_string()))?;
        let mut norms: Vec<tokenizers::NormalizerWrapper> = Vec::new();
        if spm.add_space_prefix {
            norms.push(tokenizers::normalizers::Prepend::new("\u{2581}".into()).into());
        }
        norms.push(replace_space.into());
        inner.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)));
        let unreplace = tokenizers::normalizers::Replace::new("\u{2581}", " ").map_err(|e| Error::invalid(OP, e.to_string()))?;
        let mut decoders: Vec<tokenizers::DecoderWrapper> =
            vec![unreplace.into(), tokenizers::decoders::byte_fallback::ByteFallback::new().into(), tokenizers::decoders::fuse::Fuse::new().into()];
        if spm.add_space_prefix {
            decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(decoders)));
        add_vocab_tokens(&mut inner, vocab, |ty| matches!(ty, TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL));

        let named = |id: Option<u32>| id.map(|id| (vocab.tokens[id as usize].clone(), id));
        let (bos, eos) = (named(vocab.bos_id), named(vocab.eos_id));
        if add_bos {
            if let Some((name, id)) = &bos {
                inner.with_post_processor(Some(bos_processor(name, *id).map_err(|e| Error::invalid(OP, e))?));
            }
        }
        let mut special_tokens = BTreeMap::new();
        for (name, id) in [("bos_token", vocab.bos_id), ("eos_token", vocab.eos_id), ("unk_token", vocab.unk_id), ("pad_token", vocab.pad_id)] {
            if let Some(id) = id {
                special_tokens.insert(name.to_string(), vocab.tokens[id as usize].clone());
            }
        }
        let mut tok = Self::assemble(inner, "GGUF vocabulary".into(), n, bos, eos, special_tokens, vocab.chat_template.clone())?;
        tok.spm = Some(Arc::new(spm));
        tok.append_eos = Self::eos_to_append(vocab)?;
        Ok(tok)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        source: String,
        vocab_size: usize,
        bos: Option<(String, u32)>,
        eos: Option<(String, u32)>,
        special_tokens: BTreeMap<String, String>,
        chat_template: Option<String>,
    ) -> Result<Tokenizer> {
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.1).collect();
        for t in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let env = chat_environment(chat_template.as_deref().unwrap_or(CHATML_TEMPLATE))
            .map_err(|e| Error::invalid("tokenizer.chat_template", format!("{source}: the chat template does not compile: {e:#}")))?;
        Ok(Tokenizer { inner, source, bos, eos, special_tokens, stop_ids, vocab_size, chat_template, env: Arc::new(env), spm: None, append_eos: None })
    }

    /// Token ids of `text`. `add_special_tokens` applies the post-processor (e.g. a BOS); special
    /// tokens written in the text (`<|im_start|>`) are always recognised.
    ///
    /// SentencePiece vocabularies from GGUF encode as llama.cpp does (see [`Tokenizer::from_gguf`]).
    /// `add_special_tokens` also appends EOS where the GGUF says `add_eos_token = true`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.spm {
            Some(spm) => spm.encode(text, add_special_tokens)?,
            None => {
                let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::invalid("tokenizer.encode", format!("{}: {e}", self.source)))?;
                enc.get_ids().to_vec()
            }
        };
        if add_special_tokens {
            ids.extend(self.append_eos);
        }
        Ok(ids)
    }

    /// The text of `ids`; `skip_special_tokens` drops special tokens (`<|im_end|>`, …).
    /// An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let size = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(Error::OutOfRange { op: "tokenizer.decode", what: "token", index: bad as i64, size });
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::invalid("tokenizer.decode", format!("{}: {e}", self.source)))
    }

    /// The id of a vocabulary entry, spelled as the vocabulary spells it (byte-level vocabularies
    /// write a space as `Ġ`: `"Ġthe"`), or of an added token (`"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (byte-level spelling; see [`Tokenizer::token_to_id`]).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of ids, added tokens included (what the model's embedding must cover).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.1)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.0.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.0.as_str())
    }

    /// Ids that end generation: the EOS id, then those of [`END_OF_TURN_TOKENS`] present in the
    /// vocabulary (for SmolLM2: `<|im_end|>` = EOS and `<|endoftext|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The model's own chat template, if it has one ([`Tokenizer::apply_chat_template`] falls back
    /// to [`CHATML_TEMPLATE`] otherwise).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers` tokenizer, for what this type does not expose (offsets, batches).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders `messages` with the model's chat template (or ChatML when it has none), as
    /// transformers' `apply_chat_template(…, tokenize=False)` does: the template sees `messages`,
    /// `add_generation_prompt`, and `bos_token`, `eos_token`, `unk_token`, `pad_token` where known.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::from(v.clone()));
        }
        let tmpl = self.env.get_template(CHAT).map_err(|e| Error::invalid("tokenizer.chat_template", format!("{e:#}")))?;
        tmpl.render(ctx).map_err(|e| Error::invalid("tokenizer.chat_template", format!("{}: rendering failed: {e:#}", self.source)))
    }

    /// Tokenizes a whole conversation (no generation prompt) and flags the answer tokens.
    ///
    /// For each assistant message `i`, the conversation rendered up to message `i` with the
    /// generation prompt marks where the answer starts, and rendered through message `i` where its
    /// turn ends; both must be prefixes of the whole rendering (true of ChatML, Llama-3 and most
    /// templates; a template that rewrites earlier turns, e.g. dropping past reasoning, is an
    /// error). Trailing whitespace after the end-of-turn is not part of the answer. The text is
    /// then tokenized piece by piece (without the post-processor, as `apply_chat_template`
    /// with `tokenize=True` does), so no token straddles an answer boundary.
    pub fn render_chat_with_masks(&self, messages: &[ChatMessage]) -> Result<ChatEncoding> {
        const OP: &str = "tokenizer.render_chat_with_masks";
        let text = self.apply_chat_template(messages, false)?;
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.apply_chat_template(&messages[..i], true)?;
            let through = self.apply_chat_template(&messages[..=i], false)?;
            crate::ensure!(
                text.starts_with(&before) && text.starts_with(&through) && through.len() >= before.len(),
                OP,
                "{}: the chat template is not prefix-stable at message {i} (rendering the conversation up to it is not a prefix of rendering the whole), so the answer cannot be located",
                self.source
            );
            let end = before.len() + through[before.len()..].trim_end().len();
            if end > before.len() {
                spans.push((before.len(), end));
            }
        }
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut pos = 0;
        let mut push = |piece: &str, answer: bool| -> Result<()> {
            if !piece.is_empty() {
                let p = self.encode(piece, false)?;
                mask.extend(std::iter::repeat(answer).take(p.len()));
                ids.extend(p);
            }
            Ok(())
        };
        for (s, e) in spans {
            crate::ensure!(s >= pos, OP, "{}: overlapping assistant spans", self.source);
            push(&text[pos..s], false)?;
            push(&text[s..e], true)?;
            pos = e;
        }
        push(&text[pos..], false)?;
        Ok(ChatEncoding { text, ids, assistant_mask: mask })
    }
}

/// A post-processor that prepends `bos` to every sequence.
fn bos_processor(bos: &str, id: u32) -> std::result::Result<TemplateProcessing, String> {
    TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B:1")))
        .map_err(|e| format!("cannot build the BOS post-processor: {e}"))?
        .special_tokens(vec![(bos.to_string(), id)])
        .build()
        .map_err(|e| format!("cannot build the BOS post-processor: {e}"))
}

/// Llama 3's.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `pre` names llama.cpp treats as Llama 3's pre-tokenizer (with `ignore_merges`).
const LLAMA3_NAMES: [&str; 7] = ["llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral"];

/// The pre-tokenizer for GGUF `pre` name, and whether an NFC normalizer goes before it.
fn pre_tokenizer_for(pre: &str) -> std::result::Result<(PreTokenizerWrapper, bool), String> {
    let split_then_bytes = |re: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("bad pre-tokenizer regex for {pre:?}: {e}"))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            (Sequence::new(vec![Digits::new(true).into(), gpt2()]).into(), false)
        }
        p if LLAMA3_NAMES.contains(&p) => (split_then_bytes(LLAMA3_SPLIT)?, false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (split_then_bytes(QWEN2_SPLIT)?, true),
        // "gpt2", "default" and unknown names: GPT-2's regex inside ByteLevel.
        _ => (gpt2(), false),
    })
}

/// GPT-2's reversible byte → printable character table: the printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100 onwards in byte order (so a space is `Ġ`, a newline `Ċ`).
pub fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("U+0100..U+0143 are valid chars")
}

/// The inverse of [`byte_to_unicode`].
pub fn unicode_to_byte(c: char) -> Option<u8> {
    let u = c as u32;
    if u < 256 {
        let b = u as u8;
        return (byte_to_unicode(b) == c).then_some(b);
    }
    (0..=255u8).find(|&b| byte_to_unicode(b) == c)
}

/// `text`'s UTF-8 bytes spelled in the byte-level alphabet.
fn to_byte_level(text: &str) -> String {
    text.bytes().map(byte_to_unicode).collect()
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Format { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })
}

/// A token name written as a string or as an AddedToken object (`{"content": …}`).
fn token_name(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A `chat_template` value: a string, or a list of `{name, template}` (the "default" one).
fn template_from_json(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n));
            named("default").or_else(|| list.first())?.get("template")?.as_str().map(str::to_string)
        }
        _ => None,
    }
}

/// Registers a GGUF vocabulary's non-empty tokens whose type `is_special` accepts as special
/// (never split, skipped when decoding) and its user-defined tokens as plain added tokens; a
/// missing type reads as normal (1), as llama.cpp does.
fn add_vocab_tokens(inner: &mut tokenizers::Tokenizer, vocab: &GgufVocab, is_special: impl Fn(i32) -> bool) {
    let ttype = |i: usize| vocab.token_type(i);
    let n = vocab.tokens.len();
    let added = |keep: &dyn Fn(i32) -> bool, special: bool| -> Vec<AddedToken> {
        (0..n)
            .filter(|&i| keep(ttype(i)) && !vocab.tokens[i].is_empty())
            .map(|i| {
                let (l, r) = vocab.strip_attrs(i);
                AddedToken::from(vocab.tokens[i].clone(), special).normalized(false).lstrip(l).rstrip(r)
            })
            .collect()
    };
    inner.add_special_tokens(&added(&is_special, true));
    inner.add_tokens(&added(&|ty| ty == TOKEN_TYPE_USER_DEFINED, false));
}

fn named_id(inner: &tokenizers::Tokenizer, name: Option<&String>) -> Option<(String, u32)> {
    let name = name?;
    inner.token_to_id(name).map(|id| (name.clone(), id))
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// A minijinja environment set up like transformers' chat-template one (trim_blocks,
/// lstrip_blocks, `raise_exception`, Python-style `tojson`, Python string/dict methods), with
/// `source` compiled as the template "chat".
fn chat_environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("the chat template raised: {msg}")))
    });
    env.add_filter("tojson", py_tojson);
    env.set_unknown_method_callback(py_method);
    // transformers' `{% generation %}` marks assistant text for its own masking; the masks here
    // come from prefix rendering, so the markers are dropped.
    let mut src = source.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            for pad in [" ", ""] {
                src = src.replace(&format!("{open}{pad}{tag}{pad}{close}"), "");
            }
        }
    }
    env.add_template_owned(CHAT, src)?;
    Ok(env)
}

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, what
/// transformers' `tojson` is: keys in the map's order, `", "` / `": "` separators.
fn py_tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &Value, indent: Option<usize>, sort: bool, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let json_str = |s: &str| serde_json::to_string(s).unwrap_or_default();
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::String => out.push_str(&json_str(v.as_str().unwrap_or_default())),
        ValueKind::Number => {
            let j = serde_json::to_value(v).map_err(|e| invalid(format!("tojson: {e}")))?;
            out.push_str(&j.to_string());
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&json_str(&k.to_string()));
                out.push_str(": ");
                write_py_json(&v.get_item(k)?, indent, sort, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            // Sequences and other iterables.
            let items: Vec<Value> = v.try_iter().map_err(|_| invalid(format!("tojson: cannot serialize a {}", v.kind())))?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(x, indent, sort, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
    }
    Ok(())
}

/// The Python methods HF chat templates call on strings and dicts, which minijinja lacks.
fn py_method(_state: &minijinja::State, value: &Value, method: &str, args: &[Value]) -> std::result::Result<Value, minijinja::Error> {
    use minijinja::value::from_args;
    if let Some(s) = value.as_str() {
        let chars_arg = |a: Option<Value>| a.filter(|v| !v.is_none() && !v.is_undefined()).map(|v| v.to_string());
        let strip = |s: &str, chars: &Option<String>, left: bool, right: bool| -> String {
            let pred = |c: char| match chars {
                Some(set) => set.contains(c),
                None => c.is_whitespace(),
            };
            let mut t = s;
            if left {
                t = t.trim_start_matches(pred);
            }
            if right {
                t = t.trim_end_matches(pred);
            }
            t.to_string()
        };
        return Ok(match method {
            "strip" | "lstrip" | "rstrip" => {
                let (c,): (Option<Value>,) = from_args(args)?;
                let c = chars_arg(c);
                Value::from(strip(s, &c, method != "rstrip", method != "lstrip"))
            }
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" | "capitalize" => {
                let mut out = String::with_capacity(s.len());
                let mut prev_letter = false;
                for (i, c) in s.chars().enumerate() {
                    let up = if method == "title" { !prev_letter } else { i == 0 };
                    if up {
                        out.extend(c.to_uppercase());
                    } else {
                        out.extend(c.to_lowercase());
                    }
                    prev_letter = c.is_alphabetic();
                }
                Value::from(out)
            }
            "startswith" | "endswith" => {
                let (p,): (Value,) = from_args(args)?;
                let candidates: Vec<String> = if p.kind() == ValueKind::Seq { p.try_iter()?.map(|x| x.to_string()).collect() } else { vec![p.to_string()] };
                Value::from(candidates.iter().any(|c| if method == "startswith" { s.starts_with(c.as_str()) } else { s.ends_with(c.as_str()) }))
            }
            "split" | "rsplit" => {
                let (sep, maxsplit): (Option<Value>, Option<i64>) = from_args(args)?;
                let sep = chars_arg(sep);
                let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
                let parts: Vec<String> = match (&sep, method, max) {
                    (Some(sep), _, _) if sep.is_empty() => return Err(invalid("empty separator")),
                    (Some(sep), "split", Some(m)) => s.splitn(m + 1, sep.as_str()).map(str::to_string).collect(),
                    (Some(sep), "split", None) => s.split(sep.as_str()).map(str::to_string).collect(),
                    (Some(sep), _, Some(m)) => {
                        let mut v: Vec<String> = s.rsplitn(m + 1, sep.as_str()).map(str::to_string).collect();
                        v.reverse();
                        v
                    }
                    (Some(sep), _, None) => s.split(sep.as_str()).map(str::to_string).collect(),
                    (None, _, None) => s.split_whitespace().map(str::to_string).collect(),
                    (None, _, Some(m)) => {
                        // Python: at most m splits on whitespace runs, the rest kept (left-stripped).
                        let mut v = Vec::new();
                        let mut rest = s.trim_start();
                        while v.len() < m && !rest.is_empty() {
                            match rest.find(char::is_whitespace) {
                                Some(k) => {
                                    v.push(rest[..k].to_string());
                                    rest = rest[k..].trim_start();
                                }
                                None => break,
                            }
                        }
                        if !rest.is_empty() {
                            v.push(rest.to_string());
                        }
                        v
                    }
                };
                Value::from(parts)
            }
            "splitlines" => Value::from(s.lines().map(str::to_string).collect::<Vec<_>>()),
            "replace" => {
                let (old, new, count): (String, String, Option<i64>) = from_args(args)?;
                match count {
                    Some(c) if c >= 0 => Value::from(s.replacen(old.as_str(), &new, c as usize)),
                    _ => Value::from(s.replace(old.as_str(), &new)),
                }
            }
            "find" | "index" => {
                let (sub,): (String,) = from_args(args)?;
                match s.find(sub.as_str()) {
                    Some(b) => Value::from(s[..b].chars().count() as i64),
                    None if method == "find" => Value::from(-1i64),
                    None => return Err(invalid("substring not found")),
                }
            }
            "count" => {
                let (sub,): (String,) = from_args(args)?;
                Value::from(if sub.is_empty() { s.chars().count() + 1 } else { s.matches(sub.as_str()).count() } as i64)
            }
            "join" => {
                let (items,): (Value,) = from_args(args)?;
                let parts: Vec<String> = items.try_iter()?.map(|x| x.to_string()).collect();
                Value::from(parts.join(s))
            }
            "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
            "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
            "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
            "isupper" => Value::from(s.chars().any(char::is_alphabetic) && !s.chars().any(char::is_lowercase)),
            "islower" => Value::from(s.chars().any(char::is_alphabetic) && !s.chars().any(char::is_uppercase)),
            _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let _: () = from_args(args)?;
                let items: Vec<Value> = value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or(Value::UNDEFINED);
                        Value::from(vec![k, v])
                    })
                    .collect();
                Ok(Value::from(items))
            }
            "keys" => {
                let _: () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let _: () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.map(|k| value.get_item(&k).unwrap_or(Value::UNDEFINED)).collect::<Vec<_>>()))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() { default.unwrap_or(Value::from(())) } else { v })
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}

// ---------------------------------------------------------------------------------------------
// SentencePiece (llama.cpp's "SPM" tokenizer)
// ---------------------------------------------------------------------------------------------

/// SentencePiece encoding as llama.cpp does it for `tokenizer.ggml.model = "llama"`.
///
/// 1. The text is split at special tokens (unknown, control and user-defined tokens written
///    literally; the longest is searched first); each becomes its id.
/// 2. Each remaining fragment gets a leading space when it starts the text or follows a special
///    token (`add_space_prefix`), and every space becomes `▁`.
/// 3. The fragment starts as one symbol per UTF-8 character. Repeatedly, of all adjacent pairs
///    whose concatenation is a vocabulary piece, the one whose piece has the highest score merges
///    (the leftmost on a tie).
/// 4. A final symbol that is a piece emits its id; one that is not (a character outside the
///    vocabulary) emits the `<0xXX>` token of each of its bytes (byte fallback), or the unknown
///    token where the vocabulary has no such byte token.
#[derive(Debug)]
struct Spm {
    /// Piece text → (id, score). A text that occurs twice maps to its last id.
    pieces: std::collections::HashMap<String, (u32, f32)>,
    /// The id of `<0xXX>` for each byte.
    byte_ids: Vec<Option<u32>>,
    unk_id: Option<u32>,
    /// The BOS id `encode(…, true)` prepends (`add_bos_token`).
    bos_id: Option<u32>,
    add_space_prefix: bool,
    /// Special token texts, longest first, with their (lstrip, rstrip) attributes.
    specials: Vec<(String, u32, bool, bool)>,
}

/// A merge candidate: adjacent symbols `left`, `right` whose concatenation (`size` bytes) is a
/// piece of `score`.
#[derive(Debug)]
struct SpmBigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for SpmBigram {}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for SpmBigram {
    /// The max-heap pops the highest score, then the leftmost pair.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

/// A symbol of the fragment being merged: bytes `start..start + len` of the text (len 0 once
/// merged into its left neighbour), linked to its live neighbours.
#[derive(Clone, Copy, Debug)]
struct SpmSymbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

type SpmRev<'a> = std::collections::HashMap<&'a str, (usize, usize)>;

impl Spm {
    fn new(vocab: &GgufVocab, add_bos: bool) -> Spm {
        let ttype = |i: usize| vocab.token_type(i);
        let mut pieces = std::collections::HashMap::with_capacity(vocab.tokens.len());
        for (i, t) in vocab.tokens.iter().enumerate() {
            pieces.insert(t.clone(), (i as u32, vocab.scores[i]));
        }
        let byte_ids = (0..=255u8).map(|b| pieces.get(&format!("<0x{b:02X}>")).map(|p| p.0)).collect();
        let mut specials: Vec<(String, u32, bool, bool)> = (0..vocab.tokens.len())
            .filter(|&i| matches!(ttype(i), TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED) && !vocab.tokens[i].is_empty())
            .map(|i| {
                let (l, r) = vocab.strip_attrs(i);
                (vocab.tokens[i].clone(), i as u32, l, r)
            })
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Spm {
            pieces,
            byte_ids,
            unk_id: vocab.unk_id,
            bos_id: if add_bos { vocab.bos_id } else { None },
            add_space_prefix: vocab.add_space_prefix.unwrap_or(true),
            specials,
        }
    }

    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        enum Frag<'a> {
            Text(&'a str),
            Token(u32),
        }
        let mut frags: Vec<Frag> = if text.is_empty() { Vec::new() } else { vec![Frag::Text(text)] };
        for (sp, id, lstrip, rstrip) in &self.specials {
            if !frags.iter().any(|f| matches!(f, Frag::Text(t) if t.contains(sp.as_str()))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Frag::Text(t) => {
                        let mut rest = t;
                        while let Some(k) = rest.find(sp.as_str()) {
                            let mut left = &rest[..k];
                            if *lstrip {
                                left = left.trim_end_matches(|c: char| c.is_ascii() && c_isspace(c as u8));
                            }
                            if !left.is_empty() {
                                next.push(Frag::Text(left));
                            }
                            next.push(Frag::Token(*id));
                            rest = &rest[k + sp.len()..];
                            if *rstrip {
                                rest = rest.trim_start_matches(|c: char| c.is_ascii() && c_isspace(c as u8));
                            }
                        }
                        if !rest.is_empty() {
                            next.push(Frag::Text(rest));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        let mut out = Vec::new();
        if add_bos {
            out.extend(self.bos_id);
        }
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let s = s.replace(' ', "\u{2581}");
                    self.encode_fragment(&s, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Queues the pair (l, r) when their concatenation is a piece.
    fn try_add<'t>(
        &self,
        text: &'t str,
        l: Option<usize>,
        r: Option<usize>,
        syms: &[SpmSymbol],
        heap: &mut std::collections::BinaryHeap<SpmBigram>,
        rev: &mut SpmRev<'t>,
    ) {
        let (Some(l), Some(r)) = (l, r) else { return };
        let piece = &text[syms[l].start..syms[l].start + syms[l].len + syms[r].len];
        if let Some(&(_, score)) = self.pieces.get(piece) {
            heap.push(SpmBigram { score, left: l, right: r, size: piece.len() });
            rev.insert(piece, (l, r));
        }
    }

    /// Steps 3 and 4 of the type docs on one whitespace-escaped fragment.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<SpmSymbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(SpmSymbol { start, len, prev: i.checked_sub(1), next: (start + len < text.len()).then_some(i + 1) });
        }
        if syms.is_empty() {
            return Ok(());
        }
        let mut heap = std::collections::BinaryHeap::new();
        // The pair each merged piece text came from, for re-splitting a non-piece (llama.cpp's
        // `rev_merge`).
        let mut rev: SpmRev = std::collections::HashMap::new();
        for i in 1..syms.len() {
            self.try_add(text, Some(i - 1), Some(i), &syms, &mut heap, &mut rev);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Stale: one side was merged away since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if let Some(nx) = r.next {
                syms[nx].prev = Some(b.left);
            }
            self.try_add(text, syms[b.left].prev, Some(b.left), &syms, &mut heap, &mut rev);
            self.try_add(text, Some(b.left), syms[b.left].next, &syms, &mut heap, &mut rev);
        }
        let mut cur = Some(0);
        while let Some(i) = cur {
            // Resegment: a piece emits its id, a merged non-piece re-splits, the rest falls back
            // to bytes (an explicit stack instead of recursion).
            let mut stack = vec![i];
            while let Some(j) = stack.pop() {
                let piece = &text[syms[j].start..syms[j].start + syms[j].len];
                if let Some(&(id, _)) = self.pieces.get(piece) {
                    out.push(id);
                } else if let Some(&(a, b)) = rev.get(piece).filter(|&&(a, b)| a != j && b != j && syms[a].len > 0 && syms[b].len > 0) {
                    stack.push(b);
                    stack.push(a);
                } else {
                    for byte in piece.bytes() {
                        match self.byte_ids[byte as usize].or(self.unk_id) {
                            Some(id) => out.push(id),
                            None => {
                                crate::bail!("tokenizer.encode", "GGUF vocabulary: byte 0x{byte:02X} has no <0x{byte:02X}> token and there is no unknown token")
                            }
                        }
                    }
                }
            }
            cur = syms[i].next;
        }
        Ok(())
    }
}
