//! Running closures on worker lcores.

use super::EnvError;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The id of the lcore the caller runs on (`u32::MAX` for non-EAL threads).
#[inline]
pub fn current() -> u32 {
    // SAFETY: reads the per-thread lcore id; valid on any thread.
    unsafe { dpdk_sys::hp_lcore_id() }
}

type Job = Box<dyn FnOnce() -> i32 + Send + 'static>;

struct Launch {
    job: Option<Job>,
    /// Set if the closure panicked, so join() can report it instead of unwinding into C.
    panicked: Arc<Mutex<bool>>,
}

unsafe extern "C" fn trampoline(arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is the Box<Launch> leaked by `launch`, passed to exactly one lcore, so we are
    // its sole owner now.
    let mut launch = unsafe { Box::from_raw(arg.cast::<Launch>()) };
    let Some(job) = launch.job.take() else {
        return -1;
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
        Ok(rc) => rc,
        Err(_) => {
            if let Ok(mut p) = launch.panicked.lock() {
                *p = true;
            }
            -1
        }
    }
}

/// A closure running on a worker lcore; [`LcoreHandle::join`] waits for it.
#[must_use = "join the lcore to learn its result"]
pub struct LcoreHandle {
    lcore: u32,
    panicked: Arc<Mutex<bool>>,
    joined: bool,
}

/// Runs `f` on worker lcore `lcore`. The lcore must be a worker of this EAL and idle.
pub fn launch<F>(lcore: u32, f: F) -> Result<LcoreHandle, EnvError>
where
    F: FnOnce() -> i32 + Send + 'static,
{
    let panicked = Arc::new(Mutex::new(false));
    let arg = Box::into_raw(Box::new(Launch {
        job: Some(Box::new(f)),
        panicked: panicked.clone(),
    }));
    // SAFETY: trampoline matches lcore_function_t; `arg` is a valid leaked Box that the
    // trampoline reclaims. On failure the lcore never runs it, so we reclaim it below.
    let rc = unsafe { dpdk_sys::rte_eal_remote_launch(Some(trampoline), arg.cast(), lcore) };
    if rc != 0 {
        // SAFETY: launch failed, so the trampoline will never see `arg`: we still own it.
        drop(unsafe { Box::from_raw(arg) });
        let reason = if rc == -libc::EBUSY {
            "lcore is busy".to_string()
        } else {
            super::strerror(rc)
        };
        return Err(EnvError::Launch { lcore, reason });
    }
    Ok(LcoreHandle {
        lcore,
        panicked,
        joined: false,
    })
}

impl LcoreHandle {
    /// The lcore this closure runs on.
    pub fn lcore(&self) -> u32 {
        self.lcore
    }

    /// Waits for the closure to return. `Err` if it panicked.
    pub fn join(mut self) -> Result<i32, String> {
        self.joined = true;
        // SAFETY: waits for the lcore we launched on; valid after EAL init.
        let rc = unsafe { dpdk_sys::rte_eal_wait_lcore(self.lcore) };
        if self.panicked.lock().map(|p| *p).unwrap_or(true) {
            return Err(format!("lcore {} panicked", self.lcore));
        }
        Ok(rc)
    }
}

impl Drop for LcoreHandle {
    fn drop(&mut self) {
        if !self.joined {
            // SAFETY: as in join(): never leave an lcore running past its handle.
            unsafe { dpdk_sys::rte_eal_wait_lcore(self.lcore) };
        }
    }
}
