//! The CUDA backend (feature `cuda`): one device (ordinal 0 or `SPECTUNE_CUDA_DEVICE`), its
//! primary context, the PTX modules compiled from `cuda/*.cu` by `cuda/build.rs` (loaded once per
//! context), a caching allocator, and checked launches.
//!
//! Everything runs on the legacy default stream, so launches and copies are ordered and a
//! device-to-host copy waits for the work before it. Every driver call is checked; a failing call
//! returns [`Error::Cuda`] naming the kernel or the operation and its shapes. Kernel faults are
//! asynchronous and surface at the next synchronizing call; `SPECTUNE_CUDA_SYNC=1` synchronizes
//! after every launch so a fault is reported with the kernel that caused it.
//!
//! Layout: `mod.rs` (runtime), `alloc.rs` (caching allocator, [`DeviceBuf`]), `kernels.rs` (the
//! [`Kernels`](crate::backend::Kernels) implementation: checked launches, no autograd).

mod alloc;
pub(crate) mod kernels;

pub(crate) use alloc::as_bytes;
pub use alloc::{memory_stats, reset_peak, DeviceBuf, MemoryStats};
pub use kernels::Cuda;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use cust::sys as cu;

use crate::error::{Error, Result};

/// The PTX of each kernel family, compiled by cuda/build.rs.
const MODULES: [(&str, &str); 8] = [
    ("matmul", include_str!(concat!(env!("OUT_DIR"), "/matmul.ptx"))),
    ("norm", include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"))),
    ("rope", include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"))),
    ("attention", include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"))),
    ("loss", include_str!(concat!(env!("OUT_DIR"), "/loss.ptx"))),
    ("adapter", include_str!(concat!(env!("OUT_DIR"), "/adapter.ptx"))),
    ("elementwise", include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"))),
    ("adamw", include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"))),
];

/// How the emulated driver (cuda/emu) names its device.
const EMULATOR_NAME: &str = "spectune CUDA emulator";

/// The initialized device.
pub struct Gpu {
    ctx: cu::CUcontext,
    /// Device name as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub total_memory: usize,
    /// True under spectune's emulated driver (cuda/emu): "CUDA (emulated)", not a GPU.
    pub emulated: bool,
    modules: Vec<(&'static str, cu::CUmodule)>,
    functions: Mutex<HashMap<&'static str, usize>>,
}
// SAFETY: the context and module handles are process-wide driver objects; the driver API is
// thread-safe once the context is made current on the calling thread (see `gpu()`).
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
thread_local! {
    static CURRENT: Cell<bool> = const { Cell::new(false) };
}

/// Turns a driver status into a Result; `what` names the call (kernel, shapes) for the error.
pub(crate) fn check(status: cu::CUresult, what: impl FnOnce() -> String) -> Result<()> {
    if status == cu::cudaError_enum::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const std::os::raw::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    let text = unsafe {
        cu::cuGetErrorString(status, &mut msg);
        if msg.is_null() {
            format!("{status:?}")
        } else {
            format!("{status:?}: {}", CStr::from_ptr(msg).to_string_lossy())
        }
    };
    Err(Error::Cuda { op: what(), msg: text })
}

fn init() -> std::result::Result<Gpu, String> {
    fn e(what: &'static str) -> impl Fn(Error) -> String {
        move |err| format!("{what}: {err}")
    }
    // SAFETY: plain driver API calls with valid out-pointers.
    unsafe {
        check(cu::cuInit(0), || "cuInit".into()).map_err(e("no usable CUDA driver"))?;
        let mut count = 0;
        check(cu::cuDeviceGetCount(&mut count), || "cuDeviceGetCount".into()).map_err(e("cannot count devices"))?;
        let ordinal: i32 = std::env::var("SPECTUNE_CUDA_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if count == 0 || ordinal >= count {
            return Err(format!("no CUDA device {ordinal} ({count} present)"));
        }
        let mut dev = 0;
        check(cu::cuDeviceGet(&mut dev, ordinal), || "cuDeviceGet".into()).map_err(e("cuDeviceGet"))?;
        let mut name = [0 as std::os::raw::c_char; 256];
        check(cu::cuDeviceGetName(name.as_mut_ptr(), 255, dev), || "cuDeviceGetName".into()).map_err(e("cuDeviceGetName"))?;
        let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let (mut major, mut minor) = (0, 0);
        use cu::CUdevice_attribute_enum as A;
        check(cu::cuDeviceGetAttribute(&mut major, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), || "cuDeviceGetAttribute".into())
            .map_err(e("compute capability"))?;
        check(cu::cuDeviceGetAttribute(&mut minor, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), || "cuDeviceGetAttribute".into())
            .map_err(e("compute capability"))?;
        if major < 8 {
            return Err(format!("{name} has compute capability {major}.{minor}; spectune's bf16 tensor-core kernels need 8.0 (Ampere) or newer"));
        }
        let mut total = 0usize;
        check(cu::cuDeviceTotalMem_v2(&mut total, dev), || "cuDeviceTotalMem".into()).map_err(e("device memory"))?;
        let mut ctx = std::ptr::null_mut();
        check(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), || "cuDevicePrimaryCtxRetain".into()).map_err(e("context"))?;
        check(cu::cuCtxSetCurrent(ctx), || "cuCtxSetCurrent".into()).map_err(e("context"))?;
        let mut modules = Vec::new();
        for (family, ptx) in MODULES {
            let src = CString::new(ptx).map_err(|_| format!("cuda/{family}.cu: PTX contains a NUL byte"))?;
            let mut module = std::ptr::null_mut();
            check(cu::cuModuleLoadData(&mut module, src.as_ptr() as *const c_void), || format!("loading the PTX of cuda/{family}.cu"))
                .map_err(|err| format!("{err} (the driver JIT-compiles PTX built for SPECTUNE_CUDA_ARCH; is the driver older than the toolkit?)"))?;
            modules.push((family, module));
        }
        let emulated = name.starts_with(EMULATOR_NAME);
        Ok(Gpu { ctx, name, capability: (major, minor), total_memory: total, emulated, modules, functions: Mutex::new(HashMap::new()) })
    }
}

/// The device, initialized on first use and made current on the calling thread.
pub fn gpu() -> Result<&'static Gpu> {
    let g = GPU.get_or_init(init).as_ref().map_err(|m| Error::Cuda { op: "CUDA initialization".into(), msg: m.clone() })?;
    if !CURRENT.with(|c| c.get()) {
        // SAFETY: a valid primary context handle.
        check(unsafe { cu::cuCtxSetCurrent(g.ctx) }, || "cuCtxSetCurrent".into())?;
        CURRENT.with(|c| c.set(true));
    }
    Ok(g)
}

/// True when a CUDA device can be used (initializes it).
pub fn available() -> bool {
    gpu().is_ok()
}

impl Gpu {
    fn function(&self, name: &'static str) -> Result<cu::CUfunction> {
        let mut map = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = map.get(name) {
            return Ok(f as cu::CUfunction);
        }
        let cname = CString::new(name).expect("kernel names have no NUL");
        for (_, m) in &self.modules {
            let mut f = std::ptr::null_mut();
            // SAFETY: valid module handle and C string.
            if unsafe { cu::cuModuleGetFunction(&mut f, *m, cname.as_ptr()) } == cu::cudaError_enum::CUDA_SUCCESS {
                map.insert(name, f as usize);
                return Ok(f);
            }
        }
        Err(Error::Cuda { op: format!("kernel {name}"), msg: "not found in any PTX module built from cuda/*.cu".into() })
    }
}

/// One kernel argument, passed by value.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    /// A `#[repr(C)]` struct of 8 four-byte fields (the attention dims).
    Dims([u32; 8]),
}

/// Marks the argument trailer after the kernelParams (see [`launch`]); "MARAPUME" in ASCII.
const PARAMS_MAGIC: u64 = 0x454d_5550_4152_414d;

impl Arg {
    /// Size in bytes | kind << 8, the kind being b'P' pointer, b'I' integer, b'F' float, b'A' struct.
    fn trailer_word(&self) -> usize {
        let (size, kind) = match self {
            Arg::Ptr(_) => (8, b'P'),
            Arg::I32(_) => (4, b'I'),
            Arg::I64(_) | Arg::U64(_) => (8, b'I'),
            Arg::F32(_) => (4, b'F'),
            Arg::F64(_) => (8, b'F'),
            Arg::Dims(_) => (32, b'A'),
        };
        size | (kind as usize) << 8
    }
}

/// Launches `name` on a grid of `grid` blocks of `block` threads and checks the launch.
/// `shapes` describes the call for error messages.
pub(crate) fn launch(name: &'static str, grid: (u32, u32, u32), block: u32, args: &[Arg], shapes: impl Fn() -> String) -> Result<()> {
    let g = gpu()?;
    let f = g.function(name)?;
    let mut vals: Vec<Arg> = args.to_vec();
    let mut ptrs: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
            Arg::F64(v) => v as *mut f64 as *mut c_void,
            Arg::Dims(v) => v.as_mut_ptr() as *mut c_void,
        })
        .collect();
    // The argument trailer: a driver reads exactly one pointer per kernel parameter and never
    // looks past them; the emulated driver (cuda/emu) reads the null, the magic word and each
    // argument's size and kind, and checks them against the kernel's PTX signature.
    ptrs.push(std::ptr::null_mut());
    ptrs.push(PARAMS_MAGIC as usize as *mut c_void);
    ptrs.extend(args.iter().map(|a| a.trailer_word() as *mut c_void));
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let what = || format!("kernel {name} ({}; grid {grid:?} × {block} threads)", shapes());
    // SAFETY: `ptrs` point into `vals`, which outlives the call; the argument list matches the
    // kernel's signature in cuda/*.cu (checked on every launch under the emulated driver, and by
    // tests/backends.rs on a GPU).
    check(unsafe { cu::cuLaunchKernel(f, grid.0, grid.1, grid.2, block, 1, 1, 0, std::ptr::null_mut(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }, what)?;
    if sync_each_launch() {
        synchronize(what)?;
    }
    Ok(())
}

fn sync_each_launch() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var("SPECTUNE_CUDA_SYNC").is_ok_and(|v| v == "1"))
}

/// Waits for all queued work; `what` names the caller in the error.
pub fn synchronize(what: impl FnOnce() -> String) -> Result<()> {
    gpu()?;
    // SAFETY: no arguments.
    check(unsafe { cu::cuCtxSynchronize() }, what)
}

/// Blocks for a grid-stride kernel over `n` elements (256 threads each, at most 65535·8 blocks).
pub(crate) fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65535 * 8) as u32
}

/// Free and total device memory in bytes, as the driver reports them.
pub fn mem_info() -> Result<(usize, usize)> {
    gpu()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid out-pointers.
    check(unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) }, || "cuMemGetInfo".into())?;
    Ok((free, total))
}
