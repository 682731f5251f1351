//! `spectune train-tiny`: adapters on a small random Decoder-style model, trained with the
//! library's [`train_step`] on one fixed batch (a repeating pattern the model memorizes).

use std::time::Instant;

use spectune::gradcheck::SplitMix;
use spectune::model::{Decoder, DecoderConfig, RopeConfig};
use spectune::ops::CeOptions;
use spectune::peft::{LoraConfig, Method as AdapterMethod, MethodOptions};
use spectune::train::data::Batch;
use spectune::train::train_step;
use spectune::{AdamW, AdamWConfig, DType, LrSchedule};

#[allow(clippy::too_many_arguments)]
pub fn train_tiny(
    method: &str,
    steps: usize,
    rank: usize,
    alpha: f64,
    k: usize,
    lr: f64,
    layers: usize,
    hidden: usize,
    batch: usize,
    seq_len: usize,
    checkpointing: bool,
    seed: u64,
    device: &str,
) -> spectune::Result<()> {
    let device = spectune::device::Device::parse(device)?;
    device.ensure_available()?;
    let heads = (hidden / 32).max(1);
    let kv_heads = if heads % 3 == 0 { heads / 3 } else { heads };
    let cfg = DecoderConfig {
        vocab_size: 512,
        hidden_size: hidden,
        intermediate_size: hidden * 8 / 3,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 10000.0, ..Default::default() },
        tie_word_embeddings: true,
        max_position_embeddings: seq_len,
        ..DecoderConfig::default()
    };
    let mut model = Decoder::random(cfg.clone(), DType::F32, seed)?;
    model.checkpointing = checkpointing;
    let adapter = AdapterMethod::parse(method, MethodOptions { k, ..Default::default() }, "train-tiny")?;
    model.attach_adapters(|_| Ok(true), &LoraConfig { rank, alpha, rslora: false, dropout: 0.0 }, &adapter, seed + 1)?;
    if device != spectune::device::Device::Cpu {
        model = model.to_device(device, DType::BF16)?;
    }
    let params = model.trainable_params();
    let trainable: usize = params.iter().map(|p| p.numel()).sum();
    let frozen: usize = cfg.expected_weights().iter().map(|(_, d)| d.iter().product::<usize>()).sum();
    let mut opt = AdamW::new(&params, AdamWConfig { lr, weight_decay: 0.01, ..AdamWConfig::default() })?;
    for p in model.no_decay_params() {
        opt.set_weight_decay(&p, false)?;
    }
    let schedule = LrSchedule::WarmupCosine { warmup: (steps / 10) as u64, total: steps as u64, min_ratio: 0.1 };
    println!(
        "model: {layers} layers, hidden {hidden}, {heads}/{kv_heads} heads, {} frozen weights; method {}: {trainable} trainable values, optimizer state {} values",
        frozen,
        adapter.name(),
        opt.state_numel()
    );
    // A fixed batch of a repeating pattern: memorizing it drives the loss down.
    let mut rng = SplitMix::new(seed + 2);
    let motif: Vec<u32> = (0..17).map(|_| (rng.next_u64() % 512) as u32).collect();
    let ids: Vec<u32> = (0..batch * seq_len).map(|i| motif[(i * 7 + i / seq_len) % motif.len()]).collect();
    let targets: Vec<i64> = (0..batch * seq_len).map(|i| if (i + 1) % seq_len == 0 { -100 } else { ids[i + 1] as i64 }).collect();
    let counted = targets.iter().filter(|&&t| t != -100).count();
    let micro = [Batch { ids, targets, key_mask: None, b: batch, t: seq_len, counted }];
    let t0 = Instant::now();
    let mut first = f64::NAN;
    for step in 0..steps {
        let lr_now = schedule.lr_at(lr, step as u64);
        // The library's training step: forward, backward, clip to norm 1, AdamW.
        let s = train_step(&mut model, &mut opt, &micro, lr_now, Some(1.0), seed.wrapping_add(step as u64))?;
        if step == 0 {
            first = s.loss;
        }
        if step % 10 == 0 || step + 1 == steps {
            println!("step {step:>4}  loss {:.4}  grad-norm {:.3}  lr {lr_now:.2e}", s.loss, s.grad_norm);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let last = model.loss(&micro[0].ids, &micro[0].targets, batch, seq_len, None, &CeOptions::default())?.item()?;
    println!("loss {first:.4} -> {last:.4} in {steps} steps, {:.0} tokens/s", (steps * batch * seq_len) as f64 / secs);
    Ok(())
}
