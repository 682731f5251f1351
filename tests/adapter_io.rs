//! Adapter files: PEFT layout, atomic writes, exact round trips for every method, clear errors.

mod common;

use spectune::gradcheck::SplitMix;
use spectune::model::{Decoder, DecoderConfig};
use spectune::peft::io::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
use spectune::peft::{LoraConfig, Method};
use spectune::DType;

fn cfg() -> DecoderConfig {
    common::tiny_config(41, true)
}

#[test]
fn every_method_round_trips_exactly() {
    let lora = LoraConfig { rank: 3, alpha: 6.0, rslora: false, dropout: 0.1 };
    for method in [Method::lora(), Method::speclora(5), Method::speclora_by_norm(4), Method::speclora_svd(3)] {
        let base = Decoder::random(cfg(), DType::F32, 1).unwrap();
        let mut m = base.clone();
        m.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj", "down_proj"]), &lora, &method, 2).unwrap();
        let mut rng = SplitMix::new(3);
        for p in m.trainable_params() {
            let n = p.numel();
            p.set_values(&rng.vec(n, -0.5, 1.5).into_iter().map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        }
        let ids: Vec<u32> = (0..10).map(|i| (i * 7 % 41) as u32).collect();
        let want = m.logits(&ids, 1, 10, None).unwrap().to_vec_f32();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, dir.path(), &lora, "random-tiny").unwrap();
        let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg_json["peft_type"], "LORA");
        assert_eq!(cfg_json["r"], 3);
        // PEFT key names and shapes.
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let a = st.tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").unwrap();
        assert_eq!(a.shape(), &[3, 16]);
        let b = st.tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").unwrap();
        assert_eq!(b.shape(), &[16, 3]);
        let mut fresh = base.clone();
        let read = load_adapter(&mut fresh, dir.path()).unwrap();
        assert_eq!(read.rank, 3);
        let got = fresh.logits(&ids, 1, 10, None).unwrap().to_vec_f32();
        assert_eq!(want, got, "{method:?}: the loaded adapter must reproduce the saved model exactly");
        assert_eq!(fresh.trainable_params().len(), m.trainable_params().len());
        // No temporary files left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}

/// A rank-2 LoRA on every linear of the tiny model, saved into a fresh temporary folder.
fn saved_rank2_lora() -> (LoraConfig, tempfile::TempDir) {
    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
    let mut m = Decoder::random(cfg(), DType::F32, 1).unwrap();
    m.attach_adapters(|_| Ok(true), &lora, &Method::lora(), 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, dir.path(), &lora, "x").unwrap();
    (lora, dir)
}

#[test]
fn bad_adapter_folders_are_clear_errors() {
    let (lora, dir) = saved_rank2_lora();
    let cpath = dir.path().join(CONFIG_FILE);
    let good = std::fs::read_to_string(&cpath).unwrap();
    let mut fresh = Decoder::random(cfg(), DType::F32, 1).unwrap();
    // Wrong rank in the config → shape error naming the tensor.
    std::fs::write(&cpath, good.replace("\"r\": 2", "\"r\": 5")).unwrap();
    let e = load_adapter(&mut fresh, dir.path()).unwrap_err().to_string();
    assert!(e.contains("lora_A.weight") && e.contains(WEIGHTS_FILE), "{e}");
    // Not LoRA.
    std::fs::write(&cpath, good.replace("\"LORA\"", "\"IA3\"")).unwrap();
    let e = load_adapter(&mut fresh, dir.path()).unwrap_err().to_string();
    assert!(e.contains("peft_type") && e.contains(CONFIG_FILE), "{e}");
    // Truncated weights.
    std::fs::write(&cpath, &good).unwrap();
    let wpath = dir.path().join(WEIGHTS_FILE);
    let w = std::fs::read(&wpath).unwrap();
    std::fs::write(&wpath, &w[..w.len() / 2]).unwrap();
    let e = load_adapter(&mut fresh, dir.path()).unwrap_err().to_string();
    assert!(e.contains(WEIGHTS_FILE), "{e}");
    // Missing folder.
    assert!(load_adapter(&mut fresh, &dir.path().join("nope")).is_err());
    // A model without adapters cannot be saved.
    assert!(save_adapter(&Decoder::random(cfg(), DType::F32, 1).unwrap(), dir.path(), &lora, "x").is_err());
}

/// Tensors that belong to no module of the model (a deeper model's layers, an unknown suffix)
/// are errors naming the tensor, and a failed load leaves the model as it was.
#[test]
fn adapter_tensors_for_missing_modules_are_errors() {
    let (_, dir) = saved_rank2_lora();

    // Saved from a 2-layer model, loaded into a 1-layer one: layer 1's tensors have no home.
    let mut shallow_cfg = cfg();
    shallow_cfg.num_hidden_layers = 1;
    let mut shallow = Decoder::random(shallow_cfg, DType::F32, 1).unwrap();
    let e = load_adapter(&mut shallow, dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.") && e.contains("1 layers") && e.contains(WEIGHTS_FILE), "{e}");
    assert!(shallow.trainable_params().is_empty(), "a failed load must not attach anything");

    // A stray tensor with an unknown suffix on an existing module.
    let wpath = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_E.weight".to_string();
    let extra = [0u8; 8];
    views.push((stray.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).unwrap()));
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&wpath, out).unwrap();
    let mut fresh = Decoder::random(cfg(), DType::F32, 1).unwrap();
    let e = load_adapter(&mut fresh, dir.path()).unwrap_err().to_string();
    assert!(e.contains(&stray), "{e}");
    assert!(fresh.trainable_params().is_empty());
}

/// The same for a full fine-tuning folder: a deeper model's matrices are an error, not ignored.
#[test]
fn full_finetuning_matrices_for_missing_layers_are_errors() {
    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
    let mut m = Decoder::random(cfg(), DType::F32, 1).unwrap();
    m.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj"]), &lora, &Method::full(), 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, dir.path(), &lora, "x").unwrap();
    // Round trip into the same shape works.
    let mut same = Decoder::random(cfg(), DType::F32, 1).unwrap();
    load_adapter(&mut same, dir.path()).unwrap();
    assert_eq!(same.trainable_params().len(), 4);
    let mut shallow_cfg = cfg();
    shallow_cfg.num_hidden_layers = 1;
    let mut shallow = Decoder::random(shallow_cfg, DType::F32, 1).unwrap();
    let e = load_adapter(&mut shallow, dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.self_attn.q_proj.weight") && e.contains("1 layers"), "{e}");
    assert!(shallow.trainable_params().is_empty(), "a failed load must not attach anything");
}
