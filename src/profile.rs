//! An optional per-op wall-clock profile (`spectune bench --profile`).
//!
//! Scopes are opened on the thread that drives the graph (ops run one after another there; the
//! kernels parallelize inside an op), keyed by (phase, name): the model opens `fwd` scopes around
//! each op call, the autograd engine opens a `bwd` scope around each backward step, named by the
//! step's [`Backward::name`](crate::autograd::Backward::name). Times are *exclusive*: a scope
//! opened inside another (the forward re-run inside a `checkpoint` backward, say) is charged to
//! itself and subtracted from its parent, so the rows add up to the profiled wall time.
//!
//! Each scope also records the process CPU time spent during it (all threads), so a row's
//! `cores` = CPU time / wall time says how well the op kept the pool busy (2.0 on two fully used
//! cores; an op that runs on one thread while the others wait shows ~1.0). Spinning workers
//! count as busy, so it is an upper bound.
//!
//! When profiling is off (the default) a scope costs one relaxed atomic load.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Default, Clone, Copy)]
struct Entry {
    calls: u64,
    exclusive: Duration,
    exclusive_cpu: Duration,
}

static TABLE: Mutex<BTreeMap<(&'static str, &'static str), Entry>> = Mutex::new(BTreeMap::new());

struct Frame {
    start: Instant,
    start_cpu: Duration,
    /// Wall and CPU time spent in scopes nested inside this one.
    child: Duration,
    child_cpu: Duration,
}

/// CPU time consumed so far by all threads of this process.
fn process_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    Duration::ZERO
}

thread_local! {
    static STACK: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// Turns profiling on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Clears the collected times.
pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// One row of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// `fwd`, `refwd` (a checkpoint's re-run), `bwd` or `step` (optimizer and bookkeeping).
    pub phase: &'static str,
    pub name: &'static str,
    pub calls: u64,
    /// Exclusive wall time, seconds.
    pub seconds: f64,
    /// Exclusive process CPU time (all threads), seconds.
    pub cpu_seconds: f64,
}

/// The collected rows, largest time first.
pub fn rows() -> Vec<Row> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<Row> = t
        .iter()
        .map(|(&(phase, name), e)| Row { phase, name, calls: e.calls, seconds: e.exclusive.as_secs_f64(), cpu_seconds: e.exclusive_cpu.as_secs_f64() })
        .collect();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v
}

/// An open scope; its time is recorded when it is dropped.
#[must_use = "a scope measures until it is dropped"]
pub struct Scope {
    key: Option<(&'static str, &'static str)>,
}

/// Opens a scope (a no-op unless profiling is enabled).
pub fn scope(phase: &'static str, name: &'static str) -> Scope {
    if !is_enabled() {
        return Scope { key: None };
    }
    let start_cpu = process_cpu_time();
    STACK.with(|s| s.borrow_mut().push(Frame { start: Instant::now(), start_cpu, child: Duration::ZERO, child_cpu: Duration::ZERO }));
    Scope { key: Some((phase, name)) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let Some(frame) = STACK.with(|s| s.borrow_mut().pop()) else { return };
        let total = frame.start.elapsed();
        let total_cpu = process_cpu_time().saturating_sub(frame.start_cpu);
        STACK.with(|s| {
            if let Some(parent) = s.borrow_mut().last_mut() {
                parent.child += total;
                parent.child_cpu += total_cpu;
            }
        });
        let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.entry(key).or_default();
        e.calls += 1;
        e.exclusive += total.saturating_sub(frame.child);
        e.exclusive_cpu += total_cpu.saturating_sub(frame.child_cpu);
    }
}

/// Runs `f` inside a `fwd` scope named `name` (`refwd` while a checkpoint backward re-runs its
/// block, so the recomputation's cost is its own rows).
#[inline]
pub fn fwd<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    let _s = if is_enabled() { scope(if crate::autograd::is_recomputing() { "refwd" } else { "fwd" }, name) } else { Scope { key: None } };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_scopes_are_exclusive() {
        enable(true);
        reset();
        let t0 = Instant::now();
        {
            let _outer = scope("test", "outer");
            std::thread::sleep(Duration::from_millis(20));
            {
                let _inner = scope("test", "inner");
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        enable(false);
        let rows: Vec<Row> = rows().into_iter().filter(|r| r.phase == "test").collect();
        let get = |n: &str| rows.iter().find(|r| r.name == n).map(|r| r.seconds).unwrap_or(-1.0);
        // The inner sleep is charged to `inner` only: the two rows add up to at most the wall time.
        assert!(get("inner") >= 0.030 && get("outer") >= 0.020);
        assert!(get("outer") + get("inner") <= wall, "outer {} + inner {} > wall {wall}", get("outer"), get("inner"));
        // CPU time: a scope that burns 30 ms of this thread's CPU records at least that much
        // process CPU time (other tests' threads can only add to it).
        let _ = scope("test", "off"); // disabled: records nothing
        assert!(super::rows().iter().all(|r| r.name != "off"));
        #[cfg(unix)]
        cpu_time_is_recorded();
    }

    #[cfg(unix)]
    fn cpu_time_is_recorded() {
        let thread_cpu = || {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: writes one timespec through a valid pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        };
        enable(true);
        {
            let _busy = scope("test", "busy");
            let t0 = thread_cpu();
            let mut x = 0u64;
            while thread_cpu() - t0 < 0.030 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        enable(false);
        let busy = super::rows().into_iter().find(|r| r.phase == "test" && r.name == "busy").expect("busy row");
        assert!(busy.cpu_seconds >= 0.030, "{busy:?}");
    }
}
