//! Crash safety of checkpoints: a process SIGKILLed at any moment of `save_checkpoint` leaves a
//! checkpoint that `load_checkpoint` restores, consistent (the adapter, the optimizer moments and
//! the trainer state all come from the same save), and a later `save_checkpoint` over whatever
//! the kill left behind (`checkpoint.partial`, `checkpoint.old`) succeeds.
//!
//! The writer is a child process: the test re-executes its own binary with `SPECTUNE_KILL_CHILD`
//! set and the filter `child_writer_loop_helper`, a test that (only then) resumes from the
//! checkpoint and trains + saves in a loop until it is killed.
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use spectune::gradcheck::SplitMix;
use spectune::model::{Decoder, DecoderConfig};
use spectune::optim::{AdamW, AdamWConfig};
use spectune::peft::io::{CONFIG_FILE, WEIGHTS_FILE};
use spectune::peft::{LoraConfig, Method};
use spectune::train::data::Batch;
use spectune::train::{load_checkpoint, optimizer_for, save_checkpoint, step_seed, train_step, TrainerState, OPTIMIZER_FILE, STATE_FILE};
use spectune::DType;

/// Set (to the run folder) only in the child process.
const ENV: &str = "SPECTUNE_KILL_CHILD";
const HELPER: &str = "child_writer_loop_helper";
const SEED: u64 = 7;
const VOCAB: usize = 50;
/// 2 layers × 7 targets × (A, B).
const N_PARAMS: usize = 2 * 7 * 2;

fn cfg() -> DecoderConfig {
    common::tiny_config(VOCAB, false)
}

fn lora() -> LoraConfig {
    LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.1 }
}

fn ocfg() -> AdamWConfig {
    AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..AdamWConfig::default() }
}

/// The frozen base (same weights in parent and child); adapters come from `attach` or a checkpoint.
fn base() -> Decoder {
    Decoder::random(cfg(), DType::F32, 1).unwrap()
}

fn fresh() -> (Decoder, AdamW) {
    let mut m = base();
    m.attach_adapters(|_| Ok(true), &lora(), &Method::lora(), 2).unwrap();
    let opt = optimizer_for(&m, ocfg()).unwrap();
    (m, opt)
}

fn batch(step: u64) -> Batch {
    let (b, t) = (2, 8);
    let mut rng = SplitMix::new(1000 + step);
    let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % VOCAB as u64) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| if i % t + 1 < t { ids[i + 1] as i64 } else { -100 }).collect();
    let counted = targets.iter().filter(|&&x| x != -100).count();
    Batch { ids, targets, key_mask: None, b, t, counted }
}

/// Trains optimizer step `step` (0-based); afterwards `step + 1` steps are done.
fn train_one(m: &mut Decoder, opt: &mut AdamW, step: u64) {
    train_step(m, opt, &[batch(step)], 1e-2, Some(1.0), step_seed(SEED, step)).unwrap();
}

/// FNV-1a over the bits of every adapter value: ties a trainer state to the adapter it was saved
/// with (the adapter is stored as f32 and the model is f32, so a save/load round trip is exact).
fn fingerprint(m: &Decoder) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in m.trainable_params() {
        for v in p.to_vec_f32() {
            for byte in v.to_bits().to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("{h:016x}")
}

fn state(step: u64, m: &Decoder) -> TrainerState {
    TrainerState { step, seed: SEED, data: json!({ "fingerprint": fingerprint(m) }) }
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_os_string();
    o.push(format!(".{s}"));
    PathBuf::from(o)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Loads `ck` onto a fresh base model and checks that it is one complete save: the adapter has
/// every parameter, the optimizer step equals the trainer step, and the adapter is the one the
/// trainer state was written with. Returns the model, optimizer and state.
fn load_consistent(ck: &Path, what: &str) -> (Decoder, AdamW, TrainerState) {
    let run = ck.parent().unwrap();
    let mut m = base();
    let (opt, lo, st) = match load_checkpoint(ck, &mut m, ocfg()) {
        Ok(x) => x,
        Err(e) => panic!("{what}: load_checkpoint failed: {e}\nleft in {}: {:?}", run.display(), listing(run)),
    };
    assert_eq!((lo.rank, lo.alpha, lo.rslora, lo.dropout), (2, 4.0, false, 0.1), "{what}: LoRA config");
    let params = m.trainable_params();
    assert_eq!(params.len(), N_PARAMS, "{what}: adapter parameter count");
    assert_eq!(opt.step_count(), st.step, "{what}: optimizer step vs trainer step");
    assert_eq!(st.seed, SEED, "{what}: seed");
    let fp = st.data.get("fingerprint").and_then(Value::as_str).unwrap_or_else(|| panic!("{what}: no fingerprint in {:?}", st.data));
    assert_eq!(fingerprint(&m), fp, "{what}: the adapter is not the one saved with step {}", st.step);
    (m, opt, st)
}

fn spawn_child(run: &Path, log: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([HELPER, "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV, run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("spawn the child writer")
}

/// Panics (with the child's stderr) if the child already exited: it should only ever be killed.
fn assert_alive(child: &mut Child, log: &Path) {
    if let Some(status) = child.try_wait().unwrap() {
        panic!("the child writer exited on its own ({status}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }
}

fn kill(child: &mut Child, log: &Path) {
    assert_alive(child, log);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A fresh folder: `run/checkpoint` holds step 0, written by this process.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let ck = run.join("checkpoint");
    let (m, opt) = fresh();
    save_checkpoint(&ck, &m, &opt, &lora(), &state(0, &m), "tiny").unwrap();
    (root, ck)
}

#[test]
fn a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable() {
    let t0 = Instant::now();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut rng = SplitMix::new(seed);
    let (root, ck) = setup();
    let run = ck.parent().unwrap().to_path_buf();
    let partial = with_suffix(&ck, "partial");
    let mut last = load_consistent(&ck, "the initial checkpoint").2.step;
    let (mut during_write, mut advanced) = (0, 0);
    for i in 0..20 {
        let what = format!("kill {i} (rng seed {seed})");
        let log = root.path().join(format!("child-{i}.log"));
        let mut child = spawn_child(&run, &log);
        if i % 2 == 0 {
            // A random moment: 1 to 150 ms after the start.
            std::thread::sleep(Duration::from_millis(1 + rng.next_u64() % 150));
        } else {
            // While a write is in progress: once `checkpoint.partial` appears (skipping a random
            // number of saves), after 0 to 3 ms.
            let skip = rng.next_u64() % 3;
            let mut seen = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert_alive(&mut child, &log);
                assert!(Instant::now() < deadline, "{what}: the child never started a checkpoint write");
                if partial.exists() {
                    if seen == skip {
                        break;
                    }
                    seen += 1;
                    while partial.exists() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            let us = rng.next_u64() % 3000;
            if us > 0 {
                std::thread::sleep(Duration::from_micros(us));
            }
            during_write += partial.exists() as usize;
        }
        kill(&mut child, &log);
        let (m, opt, st) = load_consistent(&ck, &what);
        // The child resumes from the last checkpoint and only moves forward.
        assert!(st.step >= last, "{what}: went back from step {last} to {}", st.step);
        advanced += (st.step > last) as usize;
        last = st.step;
        if i % 3 == 2 {
            // This process saves over the leftovers itself (otherwise the next child does).
            save_checkpoint(&ck, &m, &opt, &lora(), &st, "tiny").unwrap_or_else(|e| panic!("{what}: save over the leftovers: {e}"));
            assert_eq!(listing(&run), vec!["checkpoint".to_string()], "{what}");
            assert_eq!(load_consistent(&ck, &what).2, st, "{what}: re-saved state");
        }
    }
    // A final save (one more step) over whatever the last kill left.
    let (mut m, mut opt, st) = load_consistent(&ck, "final");
    train_one(&mut m, &mut opt, st.step);
    save_checkpoint(&ck, &m, &opt, &lora(), &state(st.step + 1, &m), "tiny").unwrap();
    assert_eq!(listing(&run), vec!["checkpoint".to_string()]);
    assert_eq!(load_consistent(&ck, "after the final save").2.step, st.step + 1);
    assert!(last > 0 && advanced > 0, "the children never completed a checkpoint (step {last})");
    eprintln!("20 kills in {:.1} s: {during_write} during a write, reached step {last}, rng seed {seed}", t0.elapsed().as_secs_f64());
}

/// The case a single random kill almost never hits: a kill between the two renames of the swap
/// (`checkpoint` → `checkpoint.old`, `checkpoint.partial` → `checkpoint`) leaves only
/// `checkpoint.old`, which `load_checkpoint` falls back to. The next run resumes from it and
/// saves; a second kill during that save must still leave a loadable checkpoint, i.e. the only
/// complete copy (`checkpoint.old`) must not be deleted before its replacement is in place.
/// `checkpoint.old` is given many extra files so that deleting it takes long enough for the kill
/// to land inside, and the kill is timed to land while `checkpoint.old` is being deleted.
#[test]
fn a_kill_after_an_interrupted_swap_leaves_a_loadable_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let ck = run.join("checkpoint");
    let (old, partial) = (with_suffix(&ck, "old"), with_suffix(&ck, "partial"));
    // Step 3 committed, step 4 fully written to `.partial`, killed after the first rename.
    let (mut m, mut opt) = fresh();
    for s in 0..3 {
        train_one(&mut m, &mut opt, s);
    }
    save_checkpoint(&ck, &m, &opt, &lora(), &state(3, &m), "tiny").unwrap();
    let extra = ck.join("extra");
    std::fs::create_dir(&extra).unwrap();
    for j in 0..4000 {
        std::fs::write(ck.join(format!("note-{j:05}.txt")), b"x").unwrap();
        std::fs::write(extra.join(format!("{j:05}")), b"x").unwrap();
    }
    train_one(&mut m, &mut opt, 3);
    let next = root.path().join("next");
    save_checkpoint(&next, &m, &opt, &lora(), &state(4, &m), "tiny").unwrap();
    std::fs::rename(&ck, &old).unwrap();
    std::fs::rename(&next, &partial).unwrap();
    assert_eq!(load_consistent(&ck, "after a kill between the renames").2.step, 3);

    let log = root.path().join("child.log");
    let mut child = spawn_child(&run, &log);
    let real = [STATE_FILE, OPTIMIZER_FILE, CONFIG_FILE, WEIGHTS_FILE];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert_alive(&mut child, &log);
        // Kill as soon as the child has put a new checkpoint in place, or as soon as it has
        // started deleting `checkpoint.old` while there is none.
        if ck.exists() || real.iter().any(|f| !old.join(f).exists()) {
            break;
        }
        if Instant::now() > deadline {
            kill(&mut child, &log);
            panic!("the child neither replaced nor deleted the checkpoint in 15 s: {:?}", listing(&run));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    kill(&mut child, &log);
    let st = load_consistent(&ck, "a kill during the save that follows an interrupted swap").2;
    assert!(st.step >= 3, "went back to step {}", st.step);
    // And a save over the leftovers cleans them up.
    let (m, opt, st) = load_consistent(&ck, "reload");
    save_checkpoint(&ck, &m, &opt, &lora(), &st, "tiny").unwrap();
    assert_eq!(listing(&run), vec!["checkpoint".to_string()]);
    assert_eq!(load_consistent(&ck, "after the final save").2, st);
}

/// Not a test of its own: the writer process of the tests above. Without `SPECTUNE_KILL_CHILD`
/// it returns at once (a no-op in normal runs). With it, it resumes from `$SPECTUNE_KILL_CHILD/
/// checkpoint` and trains one step + saves a checkpoint in a loop, printing nothing, until the
/// parent kills it (or 60 s pass, so that an orphan does not run forever).
#[test]
fn child_writer_loop_helper() {
    let Some(run) = std::env::var_os(ENV) else { return };
    let ck = PathBuf::from(run).join("checkpoint");
    let mut m = base();
    let (mut opt, lo, st) = load_checkpoint(&ck, &mut m, ocfg()).expect("child: resume from the checkpoint");
    let t0 = Instant::now();
    let mut step = st.step;
    while t0.elapsed() < Duration::from_secs(60) {
        train_one(&mut m, &mut opt, step);
        step += 1;
        save_checkpoint(&ck, &m, &opt, &lo, &state(step, &m), "tiny").expect("child: save_checkpoint");
    }
    panic!("child: not killed within 60 s");
}
