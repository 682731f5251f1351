//! `Decoder::checkpoint_keep`: how many final layers keep their activations under checkpointing.
//! Its own test binary: it counts backward steps through the process-wide profiler, which
//! other tests' concurrent backward passes would add to.
mod common;

use spectune::model::Decoder;
use spectune::ops::CeOptions;
use spectune::peft::{LoraConfig, Method};
use spectune::{backward, DType};

#[test]
fn checkpoint_keep_sets_how_many_layers_are_recomputed() {
    let cfg = common::tiny_config(37, false);
    let layers = cfg.num_hidden_layers as u64;
    assert!(layers >= 2, "the test needs a model of 2+ layers");
    let ids: Vec<u32> = (0..16).map(|i| (i * 7 % 37) as u32).collect();
    let targets: Vec<i64> = (0..16).map(|i| if i % 8 == 7 { -100 } else { ids[i + 1] as i64 }).collect();
    // The tape of a checkpointed forward holds one `checkpoint` step per re-run layer.
    let count = |keep: usize| {
        let mut m = Decoder::random(cfg.clone(), DType::F32, 3).unwrap();
        m.checkpointing = true;
        m.checkpoint_keep = keep;
        m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 }, &Method::lora(), 1).unwrap();
        let loss = m.loss(&ids, &targets, 2, 8, None, &CeOptions::default()).unwrap();
        spectune::profile::enable(true);
        spectune::profile::reset();
        backward(&loss).unwrap();
        spectune::profile::enable(false);
        spectune::profile::rows().iter().find(|r| r.phase == "bwd" && r.name == "checkpoint").map_or(0, |r| r.calls)
    };
    assert_eq!(count(0), layers);
    assert_eq!(count(1), layers - 1);
    assert_eq!(count(layers as usize), 0);
    assert_eq!(count(layers as usize + 5), 0);
}
