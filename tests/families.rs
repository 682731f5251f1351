//! Every decoder family against transformers at every position: the tiny checkpoints of
//! tests/data/families (written by make_families.py with transformers; random weights, each
//! family's distinguishing features switched on, a 12-token probe longer than the sliding
//! windows and LongRoPE's original context) loaded through the real loader, logits compared at
//! all 2 × 12 positions.
//!
//! A family spectune does not implement yet must be refused with an error naming what is
//! missing — never loaded and run silently wrong. The table below says which is which; a family
//! that starts to load must also start to match.

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use spectune::io::Checkpoint;
use spectune::DType;

enum Expect {
    /// Logits within |a − b| ≤ 1e-4·max(1, |b|) at every position.
    Match,
    /// Loading fails with an error containing every one of these words.
    Refused(&'static [&'static str]),
}

static FAMILIES: [(&str, Expect); 9] = [
    ("llama", Expect::Match),
    ("llama3", Expect::Refused(&["rope_type", "llama3"])),
    ("llama_bias", Expect::Refused(&["mlp_bias"])),
    ("mistral", Expect::Refused(&["sliding_window"])),
    ("qwen2", Expect::Match),
    ("qwen3", Expect::Refused(&["Qwen3ForCausalLM"])),
    ("gemma2", Expect::Refused(&["Gemma2ForCausalLM"])),
    ("gemma3", Expect::Refused(&["Gemma3ForCausalLM"])),
    ("phi3", Expect::Refused(&["Phi3ForCausalLM"])),
];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/families").join(name)
}

/// (input ids [2, T], logits [2, T, V]) from golden.safetensors, read with the `safetensors`
/// crate (independently of the crate's own loader).
fn golden(name: &str) -> (Vec<u32>, Vec<f64>, [usize; 3]) {
    let path = dir(name).join("golden.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (ids, logits) = (st.tensor("input_ids").unwrap(), st.tensor("logits").unwrap());
    assert_eq!((ids.dtype(), logits.dtype()), (Dtype::I64, Dtype::F32));
    let ids = ids.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    let d = logits.shape();
    let values = logits.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect();
    (ids, values, [d[0], d[1], d[2]])
}

#[test]
fn every_family_matches_transformers_at_every_position_or_is_refused_by_name() {
    let mut failures = Vec::new();
    for (name, expect) in &FAMILIES {
        let r = std::panic::catch_unwind(|| check(name, expect));
        if let Err(e) = r {
            failures.push(e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{name}: failed")));
        }
    }
    assert!(failures.is_empty(), "{} of {} families failed:\n{}", failures.len(), FAMILIES.len(), failures.join("\n"));
}

fn check(name: &str, expect: &Expect) {
    {
        let loaded = Checkpoint::open(&dir(name)).and_then(|ck| ck.llama(DType::F32));
        match (expect, loaded) {
            (Expect::Match, Ok(model)) => {
                let (ids, want, [b, t, v]) = golden(name);
                let got = model.logits(&ids, b, t, None).unwrap_or_else(|e| panic!("{name}: forward: {e}")).to_vec_f64();
                assert_eq!(got.len(), b * t * v, "{name}: logits shape");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let (row, pos) = (i / (t * v), (i / v) % t);
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{name}: sequence {row} position {pos} vocab {}: {g} vs transformers {w}", i % v);
                }
            }
            (Expect::Match, Err(e)) => panic!("{name}: expected to load and match transformers, got: {e}"),
            (Expect::Refused(words), Ok(_)) => {
                panic!("{name}: loaded, but the table says it is not implemented (refused naming {words:?}): make it match transformers and flip the table")
            }
            (Expect::Refused(words), Err(e)) => {
                let msg = e.to_string();
                for w in words.iter() {
                    assert!(msg.contains(w), "{name}: the refusal should name `{w}`: {msg}");
                }
            }
        }
    }
}
