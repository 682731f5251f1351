//! HF safetensors checkpoints over a memory map: single files and sharded folders.
//!
//! [`SafetensorsCheckpoint::open`] maps each file once (`Arc<Mmap>`) and parses its header with
//! the `safetensors` crate; [`SafetensorsCheckpoint::tensor`] returns a frozen [`Tensor`] that
//! views the mapped bytes ([`Tensor::from_mmap`]): nothing is copied, whatever the dtype (f32
//! and f64 are used in place, bf16/f16 are converted per use, a tile at a time).
//!
//! ## What is validated, and where
//!
//! The `safetensors` crate (`SafeTensors::read_metadata`) checks: the 8-byte header length is
//! present, at most 100 MB and inside the file; the header is UTF-8 JSON of the expected schema
//! (known dtype names, integer shapes, two data offsets); each tensor's byte range matches its
//! shape × dtype size without overflow; the ranges, sorted by offset, tile the data section
//! exactly (start at 0, no gap, no overlap); the last range ends exactly at the end of the file.
//! Its errors do not always name the tensor, so on failure this module re-reads the header
//! itself and names the first offending tensor (truncation, overlap, gap, size mismatch).
//!
//! Added here: every error names the file (and the tensor); a tensor name listed twice in a
//! header is an error (serde_json keeps the last silently); dtypes the engine cannot compute
//! with (integers, bool, fp8, fp4/fp6) are listed but refused when requested; a sharded index
//! must be a JSON object with a `weight_map` of tensor → shard file names that stay inside the
//! folder; every shard it names must exist and hold the tensors the index assigns to it; no
//! tensor may appear in two shards; [`SafetensorsCheckpoint::validate_weights`] checks names,
//! shapes and dtypes against a config before any compute.
//!
//! Safety of the maps: as with every memory-mapped reader, the files must not be modified or
//! truncated while a checkpoint (or a tensor from it) is alive.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ::safetensors::tensor::{Metadata, SafeTensors};
use ::safetensors::Dtype as StDtype;
use memmap2::Mmap;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// File name of a single-file checkpoint inside a model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index inside a model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How many problems [`SafetensorsCheckpoint::validate_weights`] spells out before summarizing.
const MAX_LISTED_PROBLEMS: usize = 20;

/// One tensor of a checkpoint, as listed in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors dtype name: `F32`, `BF16`, `F16`, `F64`, `I64`, `U8`, `F8_E4M3`, …
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The file holding the tensor (a shard of a sharded checkpoint).
    pub file: PathBuf,
    /// Absolute byte offset of the first element in `file`.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

impl TensorInfo {
    /// The engine dtype, or None when the engine cannot load this dtype.
    pub fn engine_dtype(&self) -> Option<DType> {
        match self.dtype.as_str() {
            "F32" => Some(DType::F32),
            "F64" => Some(DType::F64),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The dtypes [`SafetensorsCheckpoint::tensor`] loads.
pub const SUPPORTED_DTYPES: &str = "F32, F64, BF16, F16";

fn engine_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F64 => Some(DType::F64),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        _ => None,
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// One mapped file with its parsed header.
struct MappedFile {
    shard: Shard,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

struct Entry {
    shard: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors checkpoint: one file, or the shards named by an index.
pub struct SafetensorsCheckpoint {
    /// What was opened: the file, the index file or the folder.
    source: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsCheckpoint")
            .field("source", &self.source)
            .field("files", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.to_path_buf(), msg: msg.into() }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source: e }
}

impl SafetensorsCheckpoint {
    /// Opens `path`: a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding
    /// `model.safetensors` (preferred) or `model.safetensors.index.json`. Every file is mapped
    /// once and its header validated; no tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        if meta.is_dir() {
            let single = path.join(SINGLE_FILE);
            let index = path.join(INDEX_FILE);
            if single.is_file() {
                Self::open_single(&single, path)
            } else if index.is_file() {
                Self::open_index(&index, path)
            } else {
                let mut found: Vec<String> = std::fs::read_dir(path)
                    .map_err(|e| io_err(path, e))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"))
                    .collect();
                found.sort();
                let found = if found.is_empty() { "none".to_string() } else { found.join(", ") };
                Err(format_err(path, format!("folder has neither {SINGLE_FILE} nor {INDEX_FILE} (safetensors files found: {found})")))
            }
        } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json")) {
            Self::open_index(path, path)
        } else {
            Self::open_single(path, path)
        }
    }

    fn open_single(file: &Path, source: &Path) -> Result<Self> {
        let MappedFile { shard, entries, metadata } = map_file(file)?;
        Ok(SafetensorsCheckpoint { source: source.to_path_buf(), shards: vec![shard], entries, metadata })
    }

    fn open_index(index: &Path, source: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| format_err(index, format!("index is not valid JSON: {e}")))?;
        let weight_map = match value.get("weight_map") {
            Some(Value::Object(m)) => m,
            Some(v) => return Err(format_err(index, format!("`weight_map` must be an object of tensor name → shard file, got {v}"))),
            None => return Err(format_err(index, "index has no `weight_map`")),
        };
        if weight_map.is_empty() {
            return Err(format_err(index, "`weight_map` is empty"));
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        // Shard file name → the tensors the index assigns to it.
        let mut assigned: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, v) in weight_map {
            let Some(file) = v.as_str() else {
                return Err(format_err(index, format!("weight_map entry for tensor `{name}` must be a file name, got {v}")));
            };
            let rel = Path::new(file);
            if file.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(format_err(index, format!("weight_map entry for tensor `{name}`: shard `{file}` must be a relative file name inside the folder")));
            }
            assigned.entry(file).or_default().push(name.as_str());
        }
        let mut shards: Vec<Shard> = Vec::with_capacity(assigned.len());
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (file, names) in assigned {
            let shard_path = dir.join(file);
            if !shard_path.is_file() {
                return Err(format_err(
                    index,
                    format!(
                        "shard `{file}` (holding tensor `{}`{}) does not exist at {}",
                        names[0],
                        if names.len() > 1 { format!(" and {} more", names.len() - 1) } else { String::new() },
                        shard_path.display()
                    ),
                ));
            }
            let MappedFile { shard, entries: tensors, metadata: meta } = map_file(&shard_path)?;
            for name in &names {
                if !tensors.contains_key(*name) {
                    return Err(format_err(
                        &shard_path,
                        format!("the index {} assigns tensor `{name}` to this shard, but the shard has no such tensor", index.display()),
                    ));
                }
            }
            let si = shards.len();
            for (name, mut e) in tensors {
                if let Some(prev) = entries.get(&name) {
                    let prev_file = &shards[prev.shard].path;
                    return Err(format_err(&shard_path, format!("tensor `{name}` is also stored in shard {}", prev_file.display())));
                }
                e.shard = si;
                entries.insert(name, e);
            }
            for (k, v) in meta {
                metadata.entry(k).or_insert(v);
            }
            shards.push(shard);
        }
        Ok(SafetensorsCheckpoint { source: source.to_path_buf(), shards, entries, metadata })
    }

    /// What was opened (file, index file or folder); named in errors about missing tensors.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The mapped files (one per shard).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The `__metadata__` string map of the header(s) (first shard wins on conflicts).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The header entry of one tensor.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.entries.get(name).map(|e| self.make_info(name, e))
    }

    fn make_info(&self, name: &str, e: &Entry) -> TensorInfo {
        TensorInfo {
            name: name.to_string(),
            dtype: e.dtype.to_string(),
            shape: e.shape.clone(),
            file: self.shards[e.shard].path.clone(),
            offset: e.start,
            nbytes: e.end - e.start,
        }
    }

    /// Every tensor's header entry, sorted by name (all dtypes, loadable or not).
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.entries.iter().map(|(n, e)| self.make_info(n, e)).collect()
    }

    /// A frozen tensor viewing `name`'s bytes in the map (zero copy). Errors name the tensor and
    /// the file: a missing tensor, or a dtype the engine cannot load (integers, bool, fp8, …).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let Some(e) = self.entries.get(name) else {
            return Err(format_err(&self.source, format!("no tensor `{name}` in this checkpoint ({} tensors)", self.entries.len())));
        };
        let shard = &self.shards[e.shard];
        let Some(dtype) = engine_dtype(e.dtype) else {
            return Err(format_err(&shard.path, format!("tensor `{name}` has dtype {}, which cannot be loaded (supported: {SUPPORTED_DTYPES})", e.dtype)));
        };
        let label = format!("{}: tensor `{name}`", shard.path.display());
        Tensor::from_mmap(shard.map.clone(), e.start, dtype, e.shape.clone(), &label)
    }

    /// Address ranges of the mapped files, one per shard (to prove zero-copy use in tests:
    /// a loaded tensor's `read().data_ptr()` lies inside one of them).
    pub fn mapped_ranges(&self) -> Vec<Range<usize>> {
        self.shards
            .iter()
            .map(|s| {
                let start = s.map.as_ptr() as usize;
                start..start + s.map.len()
            })
            .collect()
    }

    /// True if `ptr` points into one of this checkpoint's maps.
    pub fn is_mapped_address(&self, ptr: *const u8) -> bool {
        let p = ptr as usize;
        self.mapped_ranges().iter().any(|r| r.contains(&p))
    }

    /// Total bytes mapped (all shards).
    pub fn mapped_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.map.len()).sum()
    }

    /// Checks, before any compute, that every weight in `expected` (HF name, shape) is
    /// present with the right shape and a loadable dtype, and that no layer tensor is left
    /// unused (an unused bias or extra layer means the config does not describe these weights).
    /// All problems are reported in one error naming each tensor, expected and got.
    /// `unused_ok`: names that may be present without being used (a tied head's `lm_head.weight`).
    pub fn validate_weights(&self, expected: &[(String, Vec<usize>)], unused_ok: &[&str]) -> Result<()> {
        let mut problems = Vec::new();
        for (name, dims) in expected {
            match self.entries.get(name) {
                None => problems.push(format!("missing tensor `{name}` (expected shape {dims:?})")),
                Some(e) => {
                    let file = self.shards[e.shard].path.display();
                    if &e.shape != dims {
                        problems.push(format!("tensor `{name}` in {file}: expected shape {dims:?}, got {:?}", e.shape));
                    }
                    if engine_dtype(e.dtype).is_none() {
                        problems.push(format!("tensor `{name}` in {file}: expected dtype {SUPPORTED_DTYPES}, got {}", e.dtype));
                    }
                }
            }
        }
        let wanted: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, e) in &self.entries {
            if wanted.contains(name.as_str()) || name.ends_with("rotary_emb.inv_freq") || unused_ok.contains(&name.as_str()) {
                continue;
            }
            if name.starts_with("model.") || name.starts_with("lm_head.") {
                problems.push(format!(
                    "tensor `{name}` in {} is not used by this config (a config/checkpoint mismatch: attention_bias, mlp_bias, num_hidden_layers, tie_word_embeddings?)",
                    self.shards[e.shard].path.display()
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let n = problems.len();
        let mut msg = format!("checkpoint does not match the model config ({n} problem{}): ", if n == 1 { "" } else { "s" });
        msg.push_str(&problems[..n.min(MAX_LISTED_PROBLEMS)].join("; "));
        if n > MAX_LISTED_PROBLEMS {
            msg.push_str(&format!("; … and {} more", n - MAX_LISTED_PROBLEMS));
        }
        Err(format_err(&self.source, msg))
    }
}

/// Maps one file and parses its header. Entries carry absolute byte ranges; `shard` is 0.
fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the map is read-only; the module docs state that checkpoint files must not be
    // modified while mapped (the usual contract of memory-mapped readers).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    let (n, meta): (usize, Metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        let detail = diagnose(&map).map(|d| format!(" ({d})")).unwrap_or_default();
        format_err(path, format!("invalid safetensors file: {e}{detail}"))
    })?;
    if let Some(dup) = duplicate_key(&map[8..8 + n]) {
        return Err(format_err(path, format!("invalid safetensors file: tensor `{dup}` is listed twice in the header")));
    }
    let data_start = 8 + n;
    let mut entries = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        // read_metadata proved s <= e and data_start + e <= file length; keep checked math anyway.
        let (Some(start), Some(end)) = (data_start.checked_add(s), data_start.checked_add(e)) else {
            return Err(format_err(path, format!("tensor `{name}`: data offsets [{s}, {e}] overflow")));
        };
        if end > map.len() || start > end {
            return Err(format_err(path, format!("tensor `{name}`: data offsets [{s}, {e}] lie outside the {}-byte file", map.len())));
        }
        entries.insert(name, Entry { shard: 0, dtype: info.dtype, shape: info.shape.clone(), start, end });
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok(MappedFile { shard: Shard { path: path.to_path_buf(), map: Arc::new(map) }, entries, metadata })
}

/// The first top-level key that appears twice in a JSON object (serde_json, and so the
/// `safetensors` crate, silently keep the last one).
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Dup;
    impl<'de> Visitor<'de> for Dup {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    serde_json::Deserializer::from_slice(header).deserialize_map(Dup).ok().flatten()
}

/// Re-reads a header the `safetensors` crate rejected and names what is wrong, tensor by
/// tensor (the crate's own messages do not always name one). None if nothing more specific is
/// found.
fn diagnose(bytes: &[u8]) -> Option<String> {
    let len = bytes.len();
    if len < 8 {
        return Some(format!("the file is {len} bytes, shorter than the 8-byte header length"));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    if n > (len - 8) as u64 {
        return Some(format!("the header length {n} runs past the end of the {len}-byte file: truncated, or not a safetensors file"));
    }
    let n = n as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).ok()?;
    let data_len = len - 8 - n;
    let mut ranges = Vec::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype: Option<StDtype> = v.get("dtype").and_then(|d| serde_json::from_value(d.clone()).ok());
        let shape: Option<Vec<usize>> = v.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok());
        let Some((s, e)) = v.get("data_offsets").and_then(|o| serde_json::from_value::<(usize, usize)>(o.clone()).ok()) else {
            return Some(format!("tensor `{name}`: data_offsets must be two non-negative integers"));
        };
        let (Some(dtype), Some(shape)) = (dtype, shape) else {
            return Some(format!("tensor `{name}`: missing or invalid dtype or shape"));
        };
        if e < s {
            return Some(format!("tensor `{name}`: data_offsets [{s}, {e}] end before they start"));
        }
        let need = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|ne| ne.checked_mul(dtype.bitsize())).map(|b| b.div_ceil(8));
        match need {
            None => return Some(format!("tensor `{name}`: shape {shape:?} of {dtype} overflows")),
            Some(b) if b != e - s => {
                return Some(format!("tensor `{name}`: shape {shape:?} of {dtype} needs {b} bytes but data_offsets [{s}, {e}] hold {}", e - s))
            }
            _ => {}
        }
        if e > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {e}] reach past the end of the {data_len}-byte data section: the file is truncated or the offsets are wrong"
            ));
        }
        ranges.push((s, e, name.as_str()));
    }
    ranges.sort();
    let mut prev: Option<(usize, usize, &str)> = None;
    for &(s, e, name) in &ranges {
        let prev_end = prev.map_or(0, |p| p.1);
        if s < prev_end {
            let (ps, pe, pn) = prev.unwrap_or((0, 0, ""));
            return Some(format!("tensor `{name}` [{s}, {e}] overlaps tensor `{pn}` [{ps}, {pe}]"));
        }
        if s > prev_end {
            return Some(format!("{} unclaimed bytes before tensor `{name}` (data_offsets must be contiguous)", s - prev_end));
        }
        prev = Some((s, e, name));
    }
    let end = prev.map_or(0, |p| p.1);
    if end < data_len {
        return Some(format!("{} bytes after the last tensor are not described by the header", data_len - end));
    }
    None
}
