//! Writing GGUF files (version 3): what `spectune export --format gguf-lora` and
//! `spectune merge --format gguf` produce, in the layout [`crate::io::gguf`] reads and llama.cpp
//! loads.
//!
//! ```text
//! header   "GGUF", version u32 = 3, tensor count u64, metadata count u64
//! metadata key (u64 length + UTF-8), value type u32, value (arrays: element type u32, count u64,
//!          elements)
//! tensors  name, n_dims u32, ne[n_dims] u64 (fastest dimension first: a [rows, cols] matrix is
//!          ne = [cols, rows]), GGML type u32, offset u64 (from the data start, aligned)
//! padding  zeros up to a multiple of the alignment (`general.alignment`, default 32)
//! data     each tensor's bytes at its offset, zero-padded to the alignment
//! ```
//!
//! The tensor bytes are produced one tensor at a time by a callback, so a merged model is never
//! held whole in memory: the table of offsets only needs each tensor's size, which follows from
//! its shape and type. The file is written to a temporary name beside the target, synced and
//! renamed, so a failed write leaves no partial file.
//!
//! Stored types: F32, F16, BF16 (row-major, little-endian) and Q8_0 — blocks of 32 values along
//! a row, each an f16 scale d = max|x| / 127 and 32 signed bytes q = round(x / d) (0 when d = 0),
//! the rounding of ggml's reference `quantize_row_q8_0`; x ≈ d·q.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::io::gguf::{GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// The GGML tensor types this writer stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl GgmlType {
    /// The GGML type id written into the tensor table.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// llama.cpp's `general.file_type` for a model whose matrices are of this type
    /// (`LLAMA_FTYPE_ALL_F32` 0, `MOSTLY_F16` 1, `MOSTLY_Q8_0` 7, `MOSTLY_BF16` 32).
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 7,
            GgmlType::BF16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of a row of `cols` values; Q8_0 needs `cols` to be a multiple of 32.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        match self {
            GgmlType::F32 => cols.checked_mul(4),
            GgmlType::F16 | GgmlType::BF16 => cols.checked_mul(2),
            GgmlType::Q8_0 => (cols % 32 == 0).then(|| cols / 32 * 34),
        }
    }

    /// `values` (a whole number of rows of `cols`) encoded in this type.
    pub fn encode(self, values: &[f32], cols: usize) -> Result<Vec<u8>> {
        let rb =
            self.row_bytes(cols).ok_or_else(|| Error::invalid("gguf_write", format!("{}: rows of {cols} values are not a multiple of 32", self.name())))?;
        if cols == 0 || values.len() % cols != 0 {
            return Err(Error::invalid("gguf_write", format!("{} values are not whole rows of {cols}", values.len())));
        }
        let mut out = Vec::with_capacity(values.len() / cols * rb);
        match self {
            GgmlType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            GgmlType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            GgmlType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            GgmlType::Q8_0 => {
                for block in values.chunks_exact(32) {
                    let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|&x| ((x * id).round() as i8) as u8));
                }
            }
        }
        Ok(out)
    }
}

/// One entry of the tensor table to write.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// llama.cpp name, e.g. `blk.0.attn_q.weight.lora_a`.
    pub name: String,
    /// Shape in spectune order (slowest first, `[rows, cols]`); written reversed as GGUF's `ne`.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Bytes of the tensor's data (rows of the last dimension).
    pub fn nbytes(&self) -> Result<usize> {
        let cols = *self.dims.last().ok_or_else(|| Error::invalid("gguf_write", format!("tensor `{}` has no dimensions", self.name)))?;
        let rows: usize = self.dims[..self.dims.len() - 1].iter().product();
        self.ty
            .row_bytes(cols)
            .and_then(|rb| rb.checked_mul(rows))
            .ok_or_else(|| Error::invalid("gguf_write", format!("tensor `{}` {:?} cannot be stored as {}", self.name, self.dims, self.ty.name())))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array is written as an array of u8 (its element type is unknowable).
            let et = items.first().map(value_type).unwrap_or(0);
            if let Some(bad) = items.iter().find(|x| value_type(x) != et) {
                return Err(Error::invalid("gguf_write", format!("metadata `{key}`: array mixes {} and {}", items[0].type_name(), bad.type_name())));
            }
            out.extend_from_slice(&et.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, key, x)?;
            }
        }
    }
    Ok(())
}

/// Writes a GGUF file at `path`: `metadata` in order (a `general.alignment` entry, a power of two
/// u32, sets the alignment), the table of `tensors`, then each tensor's bytes from
/// `data(i)`, which must return exactly [`TensorSpec::nbytes`] bytes for tensor `i`.
pub fn write_gguf(path: &Path, metadata: &[(String, GgufValue)], tensors: &[TensorSpec], mut data: impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
    const OP: &str = "gguf_write";
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => *a as u64,
        Some((_, v)) => return Err(Error::invalid(OP, format!("general.alignment = {v} is not a power-of-two u32"))),
    };
    for (i, (k, _)) in metadata.iter().enumerate() {
        if metadata[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(Error::invalid(OP, format!("metadata key `{k}` given twice")));
        }
    }
    let mut head = Vec::new();
    head.extend_from_slice(&GGUF_MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }
    let align = |n: u64| n.div_ceil(alignment) * alignment;
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        if t.dims.is_empty() || t.dims.len() > crate::io::gguf::MAX_DIMS {
            return Err(Error::invalid(OP, format!("tensor `{}` has {} dimensions (1 to 4 allowed)", t.name, t.dims.len())));
        }
        let n = t.nbytes()?;
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        sizes.push(n);
        offset = align(offset + n as u64);
    }
    let pad = align(head.len() as u64) as usize - head.len();
    head.resize(head.len() + pad, 0);

    super::write_atomically(path, |w, tio| {
        w.write_all(&head).map_err(tio)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() != sizes[i] {
                return Err(Error::invalid(
                    OP,
                    format!("tensor `{}`: {} data bytes, expected {} ({:?} {})", t.name, bytes.len(), sizes[i], t.dims, t.ty.name()),
                ));
            }
            w.write_all(&bytes).map_err(tio)?;
            let pad = align(bytes.len() as u64) as usize - bytes.len();
            w.write_all(&vec![0u8; pad]).map_err(tio)?;
        }
        Ok(())
    })
}
