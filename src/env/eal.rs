//! EAL initialisation and cleanup.

use super::{last_errno, strerror, EnvError};
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, Ordering};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The initialised DPDK environment. Dropping it calls `rte_eal_cleanup`.
///
/// EAL can be initialised once per process: a second [`Eal::init`] returns
/// [`EnvError::EalAlreadyInitialised`], and tests that start EAL run one process per case.
pub struct Eal {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Eal {
    /// Initialises EAL from an argument list as testpmd takes it (`-l 0-1 --no-huge ...`);
    /// a program name is prepended.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal, EnvError> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(EnvError::EalAlreadyInitialised);
        }
        if !super::mbuf::layout_matches_c() {
            return Err(EnvError::EalInit("rte_mbuf layout differs between bindgen and the C compiler: rebuild dpdk-sys against the installed DPDK".into()));
        }
        let mut owned =
            vec![CString::new("hostplane").map_err(|_| EnvError::BadArgument("hostplane".into()))?];
        for a in args {
            owned.push(
                CString::new(a.as_ref()).map_err(|_| EnvError::BadArgument(a.as_ref().into()))?,
            );
        }
        // rte_eal_init may permute argv; give it a private array of pointers into `owned`,
        // which stays alive (and unmodified in content) until after the call.
        let mut argv: Vec<*mut c_char> = owned.iter().map(|s| s.as_ptr() as *mut c_char).collect();
        argv.push(std::ptr::null_mut());
        let argc = owned.len() as i32;
        // SAFETY: argv holds `argc` valid NUL-terminated strings followed by NULL; EAL only reads
        // the strings (it may reorder the pointer array, which is ours). Called once per process,
        // guarded by INITIALISED.
        let ret = unsafe { dpdk_sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if ret < 0 {
            // EAL may leave partial state; it cannot be re-initialised, so INITIALISED stays set.
            return Err(EnvError::EalInit(strerror(last_errno())));
        }
        // EAL keeps pointers into argv for some options (e.g. --file-prefix); keep them alive.
        std::mem::forget(owned);
        Ok(Eal {
            _not_send: std::marker::PhantomData,
        })
    }

    /// Number of lcores EAL was given (main included).
    pub fn lcore_count(&self) -> u32 {
        // SAFETY: EAL is initialised (we hold an Eal).
        unsafe { dpdk_sys::rte_lcore_count() }
    }

    /// The main lcore id.
    pub fn main_lcore(&self) -> u32 {
        // SAFETY: EAL is initialised.
        unsafe { dpdk_sys::rte_get_main_lcore() }
    }

    /// Worker lcore ids in ascending order (main excluded).
    pub fn worker_lcores(&self) -> Vec<u32> {
        let mut out = Vec::new();
        // RTE_MAX_LCORE as u32::MAX-1 sentinel: rte_get_next_lcore(-1, ...) starts from the first.
        let mut i = u32::MAX;
        loop {
            // SAFETY: EAL is initialised; rte_get_next_lcore only reads the lcore config table.
            let next = unsafe { dpdk_sys::rte_get_next_lcore(i, 1, 0) };
            if next >= dpdk_sys::RTE_MAX_LCORE {
                break;
            }
            out.push(next);
            i = next;
        }
        out
    }

    /// Whether `lcore` is enabled in this EAL.
    pub fn lcore_enabled(&self, lcore: u32) -> bool {
        // SAFETY: EAL is initialised; out-of-range ids return 0.
        lcore < dpdk_sys::RTE_MAX_LCORE && unsafe { dpdk_sys::rte_lcore_is_enabled(lcore) } != 0
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: all lcores were joined by their LcoreHandles (which borrow nothing from Eal but
        // are joined before main returns); rte_eal_cleanup releases hugepage/in-memory state.
        unsafe {
            dpdk_sys::rte_eal_mp_wait_lcore();
            dpdk_sys::rte_eal_cleanup();
        }
    }
}
