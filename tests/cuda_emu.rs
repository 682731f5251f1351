//! The device-memory paths of the CUDA backend that the op tests do not reach: running out of
//! device memory, and (under the emulated driver only) the NaN fill of fresh memory that makes
//! reads of uninitialized device memory visible.
//!
//! Like the `cuda::*` tests in tests/backends.rs these need a device, so they are ignored in a
//! plain `cargo test`; `cuda/emulate.sh test` runs them on the emulated driver ("CUDA
//! (emulated)") and `cuda/gpu-test.sh` on a GPU.
#![cfg(feature = "cuda")]

use spectune::backend::cuda::{gpu, mem_info, DeviceBuf};
use spectune::{DType, Error};

/// Asking for more than the device has fails with `DeviceOom`, naming the op and the bytes
/// asked, free and held; the allocator releases its cache and retries before giving up, and the
/// device stays usable afterwards.
#[test]
#[ignore = "needs a CUDA device: cuda/emulate.sh test (emulated) or cuda/gpu-test.sh (GPU)"]
fn out_of_memory_names_asked_and_free() {
    let g = gpu().expect("a CUDA device");
    let held = DeviceBuf::zeros(DType::F32, 1 << 16, "oom test: held").unwrap();
    let (_, total) = mem_info().unwrap();
    let numel = total / 4 + 1024; // more f32 elements than the device has bytes / 4
    let err = DeviceBuf::new(DType::F32, numel, "oom test: too big").expect_err("an allocation larger than the device must fail");
    match &err {
        Error::DeviceOom { op, asked, free, total: t, held: h } => {
            assert_eq!(op, "oom test: too big");
            assert!(*asked >= numel * 4, "asked {asked} < {} bytes", numel * 4);
            assert!(free < asked, "free {free} ≥ asked {asked}");
            assert_eq!(*t, total);
            assert!(*h >= (1 << 16) * 4, "held {h} does not count the live buffer");
        }
        e => panic!("expected DeviceOom, got {e}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("oom test: too big"), "the message must name the op: {msg}");
    // Still usable: a small allocation and a round trip work.
    let b = DeviceBuf::from_f32(&[1.0, 2.0, 3.0], "oom test: after").unwrap();
    assert_eq!(b.to_f32().unwrap(), vec![1.0, 2.0, 3.0]);
    drop(held);
    println!("{} on {}: {msg}", if g.emulated { "CUDA (emulated)" } else { "GPU" }, g.name);
}

/// Under the emulated driver a fresh or reused block reads as NaN until written; zeros() clears
/// it. (On a GPU fresh memory holds whatever was there, so only the emulation is checked.)
#[test]
#[ignore = "needs a CUDA device: cuda/emulate.sh test (emulated) or cuda/gpu-test.sh (GPU)"]
fn emulator_fills_fresh_memory_with_nan() {
    let g = gpu().expect("a CUDA device");
    if !g.emulated {
        println!("{}: a GPU, not the emulated driver; the NaN fill is the emulation's", g.name);
        return;
    }
    for round in 0..2 {
        // Round 1 gets the block round 0 dropped (the allocator's cache), overwritten in between.
        let b = DeviceBuf::new(DType::F32, 999, "nan fill test").unwrap();
        let v = b.to_f32().unwrap();
        assert!(v.iter().all(|x| x.is_nan()), "round {round}: fresh device memory must read as NaN under the emulation");
        b.write_bytes(&vec![0u8; 999 * 4], "nan fill test").unwrap();
        let bf = DeviceBuf::new(DType::BF16, 33, "nan fill test").unwrap();
        assert!(bf.to_f32().unwrap().iter().all(|x| x.is_nan()), "round {round}: bf16 too");
    }
    let z = DeviceBuf::zeros(DType::F32, 999, "nan fill test").unwrap();
    assert!(z.to_f32().unwrap().iter().all(|&x| x == 0.0));
    println!("CUDA (emulated) on {}: fresh and reused blocks read as NaN", g.name);
}

/// A device buffer is read and written from a thread that never launched anything (as a CPU
/// kernel's rayon worker does when an operand lives on the device): the copies must make the
/// context current on that thread themselves (the driver rejects them otherwise with
/// CUDA_ERROR_INVALID_CONTEXT, which the emulation reproduces).
#[test]
#[ignore = "needs a CUDA device: cuda/emulate.sh test (emulated) or cuda/gpu-test.sh (GPU)"]
fn copies_work_from_a_fresh_thread() {
    gpu().expect("a CUDA device");
    let b = DeviceBuf::from_f32(&[1.0, 2.0, 3.0, 4.0], "fresh thread test").unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(b.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
            let bytes: Vec<u8> = [5.0f32, 6.0, 7.0, 8.0].iter().flat_map(|v| v.to_le_bytes()).collect();
            b.write_bytes(&bytes, "fresh thread test").unwrap();
            b.write_range(3, &9.0f32.to_le_bytes(), "fresh thread test").unwrap();
        });
    });
    assert_eq!(b.to_f32().unwrap(), vec![5.0, 6.0, 7.0, 9.0]);
}
