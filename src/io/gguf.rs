//! GGUF (versions 2 and 3) reader: metadata, tensor table and memory-mapped tensors, by
//! llama.cpp name. Model knowledge (which family an architecture is, HF ↔ llama.cpp names, the
//! converter's transforms) lives in [`crate::model::gguf`]; the row permutation is here.
//!
//! # The format, as read here
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic "GGUF" | u32 version (2 or 3) | u64 tensor_count | u64 metadata_kv_count
//! kv       string key | u32 value_type | value                      (metadata_kv_count times)
//! tensor   string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset
//!                                                                   (tensor_count times)
//! padding  up to the next multiple of `general.alignment` (default 32)
//! data     tensor bytes; each tensor at data_start + offset, offset a multiple of the alignment
//! string   u64 length | UTF-8 bytes (no terminator)
//! value    u8 i8 u16 i16 u32 i32 f32 bool(u8 0/1) string | array | u64 i64 f64
//!          (value types 0..=12 in that order; array = 9)
//! array    u32 element_type | u64 count | count elements (arrays may nest)
//! ```
//!
//! `ne` lists dimensions fastest-varying first, so a GGUF tensor with `ne = [in, out]` is the
//! row-major `[out, in]` matrix of HF and spectune: [`GgufTensorInfo::dims`] is `ne` reversed.
//!
//! Version 1 (32-bit counts and lengths) is rejected. Every read is bounds-checked against the
//! file; lengths and counts are checked against the bytes left before anything is allocated, so
//! a malformed file yields an [`Error::Format`] naming the file and the key or tensor at fault,
//! never a panic or an out-of-bounds read.
//!
//! # Tensor types
//!
//! [`GgufFile::tensor`] maps F32 (0), F16 (1), Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8),
//! Q2_K … Q6_K (10–14), IQ4_NL (20), IQ4_XS (23) and BF16 (30) without copying; the weights are
//! dequantized per use (see [`crate::dtype::DType::dequantize_block`]). Files holding other
//! types (Q8_K, the IQ2/IQ3/IQ1 families, TQ*, MXFP4, …) still open and list; asking for such a
//! tensor is an error naming the type. Asking for a quantized tensor also checks the f16
//! scales of its blocks: a NaN or infinite scale is reported as a corrupted block (file,
//! tensor, type, block, byte). A row length (`ne[0]`) that is not a whole number of blocks —
//! e.g. 896 for a K-quant, whose super-blocks hold 256 — is rejected when the file is opened.
//!
//! # llama.cpp's q/k row permutation
//!
//! llama.cpp applies rotary embeddings to adjacent pairs `(x[2i], x[2i+1])` of each head, while
//! HF Llama rotates `(x[i], x[i + d/2])` (rotate_half). Its converter therefore reorders the rows
//! of `q_proj` and `k_proj` (and their biases) per head with
//! `w.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(out, in)`, where `d` = rows per head:
//!
//! ```text
//! gguf row  h·d + 2i + s   =   HF row  h·d + s·d/2 + i        (s ∈ {0, 1}, i < d/2)
//! ```
//!
//! i.e. within each head the first half and second half of the HF rows are interleaved. For
//! `k_proj` the converter uses `n_head = head_count_kv`. [`unpermute_qk_rows`] gives the row
//! order that undoes this with [`Tensor::permute_rows`] (logical HF row `h·d + s·d/2 + i` reads
//! physical row `h·d + 2i + s`), which keeps mapped weights mapped. Which architectures are
//! permuted is model knowledge ([`crate::model::gguf`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::tokenizer::GgufVocab;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a GGML tensor can have.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays this reader accepts (guards the stack).
const MAX_ARRAY_DEPTH: usize = 8;

/// GGUF metadata value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Name of a GGUF metadata value type id.
fn value_type_name(t: u32) -> &'static str {
    match t {
        vt::U8 => "u8",
        vt::I8 => "i8",
        vt::U16 => "u16",
        vt::I16 => "i16",
        vt::U32 => "u32",
        vt::I32 => "i32",
        vt::F32 => "f32",
        vt::BOOL => "bool",
        vt::STRING => "string",
        vt::ARRAY => "array",
        vt::U64 => "u64",
        vt::I64 => "i64",
        vt::F64 => "f64",
        _ => "unknown",
    }
}

/// Smallest encoded size of one value of type `t` (used to cap counts by the bytes left).
fn min_value_bytes(t: u32) -> Option<u64> {
    Some(match t {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all of one type (arrays may nest).
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF type name: "u8", "i32", "f32", "bool", "string", "array", …
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
    /// Any integer that is ≥ 0 (of any width or signedness), as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any integer that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }
    /// Any number (integer or float), as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Compact display: strings quoted (long ones cut), arrays of more than 8 elements summarized.
impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::String(s) => {
                const MAX: usize = 60;
                if s.chars().count() > MAX {
                    let cut: String = s.chars().take(MAX).collect();
                    write!(f, "{:?}… ({} bytes)", cut, s.len())
                } else {
                    write!(f, "{s:?}")
                }
            }
            GgufValue::Array(a) => {
                if a.len() > 8 {
                    let ty = a.first().map_or("?", |v| v.type_name());
                    write!(f, "[{} × {ty}: {}, {}, {}, …]", a.len(), a[0], a[1], a[2])
                } else {
                    write!(f, "[")?;
                    for (i, v) in a.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{v}")?;
                    }
                    write!(f, "]")
                }
            }
        }
    }
}

/// Name and block layout of the GGML tensor type `id`: (name, elements per block, bytes per
/// block). The layout is `None` for types whose block size this reader does not record.
fn ggml_type(id: u32) -> Option<(&'static str, Option<(u64, u64)>)> {
    Some(match id {
        0 => ("f32", Some((1, 4))),
        1 => ("f16", Some((1, 2))),
        2 => ("q4_0", Some((32, 18))),
        3 => ("q4_1", Some((32, 20))),
        4 => ("q4_2 (removed)", None),
        5 => ("q4_3 (removed)", None),
        6 => ("q5_0", Some((32, 22))),
        7 => ("q5_1", Some((32, 24))),
        8 => ("q8_0", Some((32, 34))),
        9 => ("q8_1", Some((32, 36))),
        10 => ("q2_k", Some((256, 84))),
        11 => ("q3_k", Some((256, 110))),
        12 => ("q4_k", Some((256, 144))),
        13 => ("q5_k", Some((256, 176))),
        14 => ("q6_k", Some((256, 210))),
        15 => ("q8_k", Some((256, 292))),
        16 => ("iq2_xxs", None),
        17 => ("iq2_xs", None),
        18 => ("iq3_xxs", None),
        19 => ("iq1_s", None),
        20 => ("iq4_nl", Some((32, 18))),
        21 => ("iq3_s", None),
        22 => ("iq2_s", None),
        23 => ("iq4_xs", Some((256, 136))),
        24 => ("i8", Some((1, 1))),
        25 => ("i16", Some((1, 2))),
        26 => ("i32", Some((1, 4))),
        27 => ("i64", Some((1, 8))),
        28 => ("f64", Some((1, 8))),
        29 => ("iq1_m", None),
        30 => ("bf16", Some((1, 2))),
        34 => ("tq1_0", None),
        35 => ("tq2_0", None),
        39 => ("mxfp4", Some((32, 17))),
        _ => return None,
    })
}

/// The name of GGML tensor type `id` ("f32", "q4_1", "q6_k", …), if known.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    ggml_type(id).map(|t| t.0)
}

/// The GGML types [`GgufFile::tensor`] reads, for error messages.
const SUPPORTED_TYPES: &str =
    "f32 (0), f16 (1), q4_0 (2), q4_1 (3), q5_0 (6), q5_1 (7), q8_0 (8), q2_k (10), q3_k (11), q4_k (12), q5_k (13), q6_k (14), iq4_nl (20), iq4_xs (23), bf16 (30)";

/// The spectune dtype that stores GGML type `id` as is, for the supported types.
pub fn ggml_dtype(id: u32) -> Option<DType> {
    Some(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2K,
        11 => DType::Q3K,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        20 => DType::IQ4NL,
        23 => DType::IQ4XS,
        30 => DType::BF16,
        _ => return None,
    })
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in spectune (row-major, slowest first) order: GGUF's `ne` reversed.
    pub dims: Vec<usize>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Its name ("q4_1", "q6_k", …) or "unknown".
    pub type_name: &'static str,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data; `None` for types whose block layout this reader does not know.
    pub size: Option<u64>,
}

impl GgufTensorInfo {
    /// GGUF's `ne`: dimensions fastest-varying first.
    pub fn ne(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    /// The spectune dtype for this tensor's type, if supported.
    pub fn dtype(&self) -> Option<DType> {
        ggml_dtype(self.ggml_type)
    }
}

/// The row order that undoes llama.cpp's q/k permutation of a `[rows, in]` projection with
/// `n_head` heads: `perm[hf_row]` = the GGUF row that holds it, ready for
/// [`Tensor::permute_rows`]. With `d = rows / n_head`:
/// `perm[h·d + s·d/2 + i] = h·d + 2i + s` (s ∈ {0, 1}, i < d/2).
/// `None` unless `rows` is a positive multiple of `2·n_head`.
pub fn unpermute_qk_rows(rows: usize, n_head: usize) -> Option<Vec<u32>> {
    if n_head == 0 || rows == 0 || rows % (2 * n_head) != 0 || u32::try_from(rows).is_err() {
        return None;
    }
    let d = rows / n_head;
    let half = d / 2;
    let mut perm = vec![0u32; rows];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                perm[h * d + s * half + i] = (h * d + 2 * i + s) as u32;
            }
        }
    }
    Some(perm)
}

/// Bounds-checked little-endian cursor over the file bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Format { path: self.path.to_path_buf(), msg: msg.into() }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// The next `n` bytes; `what` names what they were for (used only in the error).
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(self.err(format!(
                "truncated file: {} needs {n} bytes at byte {} but the file ends at byte {} ({} bytes left)",
                what(),
                self.pos,
                self.buf.len(),
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A GGUF string: u64 length then that many UTF-8 bytes.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{}: string length {len} (read at byte {at}) runs past the end of the {}-byte file ({} bytes left)",
                what(),
                self.buf.len(),
                self.remaining()
            )));
        }
        let start = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.err(format!("{}: string at byte {start} is not valid UTF-8 ({e})", what()))),
        }
    }
    /// A metadata value of type `ty`; `what` names the key (and element) for errors.
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            vt::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            vt::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            vt::U32 => GgufValue::U32(self.u32(what)?),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            vt::BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => return Err(self.err(format!("{}: bool at byte {at} is {b}, expected 0 or 1", what()))),
                }
            }
            vt::STRING => GgufValue::String(self.string(what)?),
            vt::U64 => GgufValue::U64(self.u64(what)?),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("{}: arrays nested more than {MAX_ARRAY_DEPTH} deep", what())));
                }
                let at = self.pos;
                let et = self.u32(&|| format!("the element type of {}", what()))?;
                let Some(min) = min_value_bytes(et) else {
                    return Err(self.err(format!("{}: array at byte {at} has unknown element type {et}, expected 0..=12", what())));
                };
                let n = self.u64(&|| format!("the length of {}", what()))?;
                if n.checked_mul(min).map_or(true, |b| b > self.remaining() as u64) {
                    return Err(self.err(format!(
                        "{}: array of {n} {} elements (read at byte {at}) needs at least {} bytes but only {} are left in the {}-byte file",
                        what(),
                        value_type_name(et),
                        n as u128 * min as u128,
                        self.remaining(),
                        self.buf.len()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    v.push(self.value(et, &|| format!("{}[{i}]", what()), depth + 1)?);
                }
                GgufValue::Array(v)
            }
            _ => return Err(self.err(format!("{}: unknown value type {ty} at byte {}, expected 0..=12", what(), self.pos.saturating_sub(4)))),
        })
    }
}

/// The parsed header of a GGUF file (everything but the tensor data).
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

fn parse(path: &Path, buf: &[u8]) -> Result<Header> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.take(4, &|| "the magic \"GGUF\"".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(r.err(format!("not a GGUF file: the first bytes are {magic:02x?}, expected \"GGUF\" ({:02x?})", GGUF_MAGIC)));
    }
    let version = r.u32(&|| "the version".to_string())?;
    match version {
        2 | 3 => {}
        1 => return Err(r.err("GGUF version 1 is not supported (32-bit counts); expected version 2 or 3 — re-convert the model with a current llama.cpp")),
        v if v > 3 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(r.err(format!("GGUF version {v} looks big-endian ({}); only little-endian files are supported", v.swap_bytes())))
        }
        v => return Err(r.err(format!("unsupported GGUF version {v}, expected 2 or 3"))),
    }
    let n_tensors = r.u64(&|| "the tensor count".to_string())?;
    let n_kv = r.u64(&|| "the metadata key/value count".to_string())?;
    // Each kv takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at least
    // 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    if n_kv.checked_mul(13).map_or(true, |b| b > r.remaining() as u64) {
        return Err(r.err(format!("header: metadata count {n_kv} cannot fit in the {} bytes left of the {}-byte file", r.remaining(), buf.len())));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let at = r.pos;
        let ty = r.u32(&|| format!("the value type of metadata `{key}`"))?;
        if min_value_bytes(ty).is_none() {
            return Err(r.err(format!("metadata `{key}`: unknown value type {ty} at byte {at}, expected 0..=12")));
        }
        let value = r.value(ty, &|| format!("metadata `{key}`"), 0)?;
        if metadata.contains_key(&key) {
            return Err(r.err(format!("metadata `{key}` appears twice")));
        }
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(r.err(format!("metadata `general.alignment` is {v} ({}), expected a power of two (u32)", v.type_name()))),
        },
    };
    if n_tensors.checked_mul(32).map_or(true, |b| b > r.remaining() as u64) {
        return Err(r.err(format!("header: tensor count {n_tensors} cannot fit in the {} bytes left of the {}-byte file", r.remaining(), buf.len())));
    }
    struct Raw {
        name: String,
        ne: Vec<u64>,
        ty: u32,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor #{i}"))?;
        let n_dims = r.u32(&|| format!("n_dims of tensor `{name}`"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(r.err(format!("tensor `{name}`: {n_dims} dimensions, expected 1..={MAX_DIMS}")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(r.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let ty = r.u32(&|| format!("the type of tensor `{name}`"))?;
        let offset = r.u64(&|| format!("the data offset of tensor `{name}`"))?;
        raw.push(Raw { name, ne, ty, offset });
    }
    let header_end = r.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    for t in raw {
        let name = &t.name;
        let fail = |msg: String| Error::Format { path: path.to_path_buf(), msg: format!("tensor `{name}`: {msg}") };
        if !seen.insert(t.name.clone()) {
            return Err(fail("appears twice in the tensor table".into()));
        }
        let numel = t.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
        let Some(numel) = numel else {
            return Err(fail(format!("ne {:?} has more elements than fit in 63 bits", t.ne)));
        };
        let dims = t.ne.iter().rev().map(|&d| usize::try_from(d)).collect::<std::result::Result<Vec<usize>, _>>();
        let Ok(dims) = dims else {
            return Err(fail(format!("ne {:?} does not fit this platform's usize", t.ne)));
        };
        let (type_name, layout) = ggml_type(t.ty).unwrap_or(("unknown", None));
        if t.offset % alignment != 0 {
            return Err(fail(format!("data offset {} is not a multiple of the alignment {alignment}", t.offset)));
        }
        let size = match layout {
            None => None,
            Some((block, bytes)) => {
                if t.ne[0] % block != 0 {
                    return Err(fail(format!("rows of {} elements (ne[0]) are not a whole number of {type_name} blocks of {block}", t.ne[0])));
                }
                Some((numel / block).checked_mul(bytes).ok_or_else(|| fail(format!("{numel} elements of {type_name} overflow a 64-bit size")))?)
            }
        };
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size.unwrap_or(0)));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len && s <= file_len => {}
            _ => {
                return Err(fail(format!(
                    "data at bytes {}..{} (data section at {data_offset} + offset {}{}) lies outside the {file_len}-byte file",
                    data_offset as u128 + t.offset as u128,
                    data_offset as u128 + t.offset as u128 + size.unwrap_or(0) as u128,
                    t.offset,
                    size.map_or(String::new(), |s| format!(", {s} bytes of {type_name}")),
                )))
            }
        }
        tensors.push(GgufTensorInfo { name: t.name.clone(), dims, ggml_type: t.ty, type_name, offset: data_offset + t.offset, size });
    }
    // No two tensors may share bytes.
    let mut order: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.size.is_some_and(|s| s > 0)).collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        let a_end = w[0].offset + w[0].size.unwrap_or(0);
        if w[1].offset < a_end {
            return Err(r.err(format!(
                "tensor `{}` (bytes {}..{}) overlaps tensor `{}` (bytes {}..{a_end})",
                w[1].name,
                w[1].offset,
                w[1].offset + w[1].size.unwrap_or(0),
                w[0].name,
                w[0].offset
            )));
        }
    }
    Ok(Header { version, alignment, data_offset, metadata, tensors })
}

/// An open GGUF file: parsed header plus the memory map the tensors view.
pub struct GgufFile {
    path: PathBuf,
    map: Option<Arc<Mmap>>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`. Tensor data is not read until asked for.
    ///
    /// The file must not be modified while it is open (it is mapped, not copied).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let len = file.metadata().map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?.len();
        // An empty file cannot be mapped on every platform; it fails parsing on its own.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only; the file must not be truncated while mapped (documented).
            Some(Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?))
        };
        let h = parse(path, map.as_deref().map_or(&[][..], |m| &m[..]))?;
        let index = h.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: h.version,
            alignment: h.alignment,
            data_offset: h.data_offset,
            metadata: h.metadata,
            tensors: h.tensors,
            index,
        })
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Format { path: self.path.clone(), msg: msg.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Byte offset of the data section (the aligned end of the header).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }
    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    /// The tensor table in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    /// One entry of the tensor table, by llama.cpp name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Tensor `name` (llama.cpp name) viewing the mapped file: shape [`GgufTensorInfo::dims`],
    /// dtype from its GGML type, nothing copied.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensor_info(name).ok_or_else(|| self.err(format!("no tensor `{name}` in this file ({} tensors)", self.tensors.len())))?;
        let dtype = info.dtype().ok_or_else(|| {
            self.err(format!(
                "tensor `{name}` has GGML type {} ({}), which spectune does not read; supported: {SUPPORTED_TYPES}",
                info.ggml_type, info.type_name
            ))
        })?;
        let map = self.map.clone().ok_or_else(|| self.err(format!("tensor `{name}`: the file is empty")))?;
        let offset =
            usize::try_from(info.offset).map_err(|_| self.err(format!("tensor `{name}`: offset {} exceeds this platform's address space", info.offset)))?;
        let t = Tensor::from_mmap(map.clone(), offset, dtype, info.dims.clone(), name).map_err(|e| self.err(format!("tensor `{name}` ({dtype}): {e}")))?;
        if dtype.is_quantized() {
            // A corrupted block (a NaN or infinite f16 scale) would turn every weight it holds
            // into NaN/inf on use; refuse it here, where the file and tensor can be named.
            if let Some((b, at, x)) = dtype.find_bad_block(t.read().mapped_bytes().unwrap_or(&[])) {
                return Err(self.err(format!(
                    "tensor `{name}` ({dtype}): block {b} (file byte {}) has a non-finite scale ({x}); the file is corrupted",
                    info.offset as u128 + (b * dtype.size() + at) as u128
                )));
            }
            // The check paged the whole tensor in; hand those pages back so that only what
            // training touches stays resident (an embedding table is read a few rows at a
            // time). The map is read-only and file-backed: a later read faults the same bytes
            // back in from the page cache.
            #[cfg(unix)]
            if let Some(size) = info.size.and_then(|s| usize::try_from(s).ok()) {
                // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops page-table
                // entries; the contents seen through the map (and any slice borrowed from it)
                // stay the file's bytes. The range lies inside the map (checked by from_mmap).
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, size) };
            }
            // And after every use: a block-quantized weight is always decoded (never used in
            // place), a tile at a time, so its pages need not stay resident between uses.
            t.release_pages_after_read();
        }
        Ok(t)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(format!("metadata `{key}` is {} ({v}), expected a string", v.type_name()))),
        }
    }
    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.err(format!("metadata `{key}` is {} ({v}), expected a non-negative integer", v.type_name()))),
        }
    }
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta_u64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v).map(Some).map_err(|_| self.err(format!("metadata `{key}` = {v} does not fit usize"))),
        }
    }
    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("metadata `{key}` is {} ({v}), expected a number", v.type_name()))),
        }
    }
    /// A number for the model config. f32 values are taken at their shortest decimal form
    /// (`1e-5` stored as f32 reads as 1e-5, not 9.99999974e-6), which is what the converter
    /// was given.
    pub fn meta_config_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            Some(GgufValue::F32(x)) => Ok(Some(x.to_string().parse::<f64>().unwrap_or(*x as f64))),
            _ => self.meta_f64(key),
        }
    }
    fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.meta_u64(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| self.err(format!("metadata `{key}` = {v} does not fit u32"))),
        }
    }
    fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(format!("metadata `{key}` is {} ({v}), expected a bool", v.type_name()))),
        }
    }
    pub fn required<T>(&self, key: &str, v: Option<T>, why: &str) -> Result<T> {
        v.ok_or_else(|| self.err(format!("metadata `{key}` is missing ({why})")))
    }
    pub fn meta_string_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.metadata.get(key) else { return Ok(None) };
        let bad = || self.err(format!("metadata `{key}` is {} ({v}), expected an array of strings", v.type_name()));
        let a = v.as_array().ok_or_else(bad)?;
        a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<Vec<_>>>().map(Some)
    }

    /// `general.architecture` (e.g. "llama", "qwen2").
    pub fn architecture(&self) -> Result<&str> {
        let key = "general.architecture";
        let arch = self.meta_str(key)?;
        self.required(key, arch, "every model file names its architecture")
    }

    /// The tokenizer fields: `tokenizer.ggml.*` and `tokenizer.chat_template`. `model` and
    /// `tokens` are required; other missing keys give `None` (or an empty list).
    pub fn vocab(&self) -> Result<GgufVocab> {
        let model_key = "tokenizer.ggml.model";
        let model = self.meta_str(model_key)?;
        let model = self.required(model_key, model, "the tokenizer type")?.to_string();
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens = self.meta_string_array(tokens_key)?;
        let tokens = self.required(tokens_key, tokens, "the vocabulary")?;
        let merges = self.meta_string_array("tokenizer.ggml.merges")?.unwrap_or_default();
        let tt_key = "tokenizer.ggml.token_type";
        let token_types = match self.metadata.get(tt_key) {
            None => Vec::new(),
            Some(v) => {
                let bad = || self.err(format!("metadata `{tt_key}` is {} ({v}), expected an array of i32", v.type_name()));
                let a = v.as_array().ok_or_else(bad)?;
                a.iter().map(|x| x.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or_else(bad)).collect::<Result<Vec<i32>>>()?
            }
        };
        let scores_key = "tokenizer.ggml.scores";
        let scores = match self.metadata.get(scores_key) {
            None => Vec::new(),
            Some(v) => {
                let bad = || self.err(format!("metadata `{scores_key}` is {} ({v}), expected an array of f32", v.type_name()));
                let a = v.as_array().ok_or_else(bad)?;
                a.iter().map(|x| x.as_f64().map(|f| f as f32).ok_or_else(bad)).collect::<Result<Vec<f32>>>()?
            }
        };
        if !scores.is_empty() && scores.len() != tokens.len() {
            return Err(self.err(format!("metadata `{scores_key}` has {} entries but `{tokens_key}` has {}", scores.len(), tokens.len())));
        }
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(self.err(format!("metadata `{tt_key}` has {} entries but `{tokens_key}` has {}", token_types.len(), tokens.len())));
        }
        let id = |name: &str| -> Result<Option<u32>> {
            let key = format!("tokenizer.ggml.{name}");
            let id = self.meta_u32(&key)?;
            match id {
                Some(i) if i as usize >= tokens.len() => Err(self.err(format!("metadata `{key}` = {i} is not a token id (vocabulary of {})", tokens.len()))),
                _ => Ok(id),
            }
        };
        Ok(GgufVocab {
            model,
            pre: self.meta_str("tokenizer.ggml.pre")?.map(str::to_string),
            merges,
            token_types,
            bos_id: id("bos_token_id")?,
            eos_id: id("eos_token_id")?,
            pad_id: id("padding_token_id")?,
            unk_id: id("unknown_token_id")?,
            add_bos: self.meta_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: self.meta_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: self.meta_bool("tokenizer.ggml.add_space_prefix")?,
            scores,
            chat_template: self.meta_str("tokenizer.chat_template")?.map(str::to_string),
            model_name: self.meta_str("general.name")?.map(str::to_string),
            tokens,
        })
    }
}
