//! The demo pipeline end to end, offline: a tiny random Llama written as an HF folder with a
//! byte-level tokenizer, generated counting stories, LoRA and SpecLoRA training; held-out loss
//! must fall, and the saved adapter must load back and reproduce the trained model's logits.

use spectune::io::Checkpoint;
use spectune::peft::Method;
use spectune::train::demo::{synthetic, DemoOptions};
use spectune::DType;

#[test]
fn lora_and_speclora_lower_held_out_loss_on_the_synthetic_task() {
    for method in [Method::lora(), Method::speclora(32)] {
        let dir = tempfile::tempdir().unwrap();
        let o = DemoOptions { steps: 120, batch: 4, seq_len: 64, out: dir.path().to_path_buf(), ..Default::default() };
        let (before, after) = synthetic(&o, method, true).unwrap();
        assert!(after < before - 1.0, "{method:?}: held-out loss {before:.3} → {after:.3}");
        // The saved adapter reproduces the trained model: load it onto the base from the HF
        // folder and compare with the checkpoint's own adapter.
        let ck = Checkpoint::open(&dir.path().join("synthetic-model")).unwrap();
        let ids: Vec<u32> = "ada has 1 pears.".bytes().map(|b| b as u32 % 256).collect();
        let mut a = spectune::model::load(&ck, DType::F32).unwrap();
        spectune::peft::io::load_adapter(&mut a, &dir.path().join("synthetic-run/adapter")).unwrap();
        let mut b = spectune::model::load(&ck, DType::F32).unwrap();
        spectune::peft::io::load_adapter(&mut b, &dir.path().join("synthetic-run/checkpoint")).unwrap();
        let base = spectune::model::load(&ck, DType::F32).unwrap();
        let (la, lb, l0) = (
            a.logits(&ids, 1, ids.len(), None).unwrap().to_vec_f32(),
            b.logits(&ids, 1, ids.len(), None).unwrap().to_vec_f32(),
            base.logits(&ids, 1, ids.len(), None).unwrap().to_vec_f32(),
        );
        assert_eq!(la, lb);
        assert_ne!(la, l0, "the adapter changes the model");
    }
}
