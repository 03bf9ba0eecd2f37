//! Reserve hugepages and mount hugetlbfs for hostplane (DPDK).
//!
//! Every /sys and /proc path goes through [`Root`], so the whole tool runs against a fake tree
//! in tests. With a fake root nothing is mounted for real: "mounting" appends a line to
//! `<root>/proc/mounts` and "unmounting" removes it (see [`mounts`]).

pub mod mounts;
pub mod pool;
pub mod status;
pub mod units;

use std::io;
use std::path::{Path, PathBuf};

use mounts::MountAction;
use pool::{PoolCounters, Scope};
use units::PageSize;

/// Everything that can go wrong; each message names the file or the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid hugepage size {0:?}: expected a power of two of at least 64K, such as 2M or 1G"
    )]
    BadPageSize(String),
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T unit, such as 512M or 2G")]
    BadMemorySize(String),
    #[error("hugepage size {size} is not supported by this kernel: {} does not exist (supported: {supported})", path.display())]
    UnsupportedSize {
        size: PageSize,
        path: PathBuf,
        supported: String,
    },
    #[error("NUMA node {node} does not exist: {} is missing", path.display())]
    NoSuchNode { node: u32, path: PathBuf },
    #[error("no default hugepage size: {} has no Hugepagesize line; pass --size", path.display())]
    NoDefaultSize { path: PathBuf },
    #[error(
        "refusing to set {size} hugepages {scope} to {requested}: {in_use} of {total} pages are in use \
         ({free} free); stop the processes holding them (see `hugepage-setup status`) first"
    )]
    InUse {
        size: PageSize,
        scope: Scope,
        requested: u64,
        total: u64,
        free: u64,
        in_use: u64,
    },
    #[error(
        "the kernel reserved only {granted} of the {requested} requested {size} hugepages {scope}, \
         most likely because memory is fragmented; the {granted} pages stay reserved. Reserve them \
         earlier (at boot, or with hugepages= on the kernel command line) or compact memory \
         (echo 1 > /proc/sys/vm/compact_memory) and retry"
    )]
    Shortfall {
        size: PageSize,
        scope: Scope,
        requested: u64,
        granted: u64,
    },
    #[error("mount directory {0:?} must be an absolute path without NUL bytes")]
    BadMountDir(String),
    #[error("cannot mount hugetlbfs on {}: something ({fstype}) is already mounted there; pass --mount DIR", path.display())]
    MountPointTaken { path: PathBuf, fstype: String },
    #[error("cannot {action} hugetlbfs on {}: {source}", path.display())]
    Mount {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {found:?} is not a number", path.display())]
    NotANumber { path: PathBuf, found: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode status as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The directory that /sys and /proc live under: `/` on a real machine, a fake tree in tests.
#[derive(Debug, Clone)]
pub struct Root {
    fake: Option<PathBuf>,
}

impl Root {
    /// `None` or `/` is the real machine; any other directory is a fake tree.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let fake = dir.filter(|d| d.as_path() != Path::new("/"));
        Root { fake }
    }

    /// True when paths are redirected into a fake tree (and mounts are only recorded).
    pub fn is_fake(&self) -> bool {
        self.fake.is_some()
    }

    /// Map an absolute machine path such as `/proc/mounts` into this root.
    pub fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        match &self.fake {
            Some(base) => base.join(abs.strip_prefix("/").unwrap_or(abs)),
            None => abs.to_owned(),
        }
    }
}

/// What `config` asks for.
#[derive(Debug, Clone)]
pub struct ConfigRequest {
    pub size: PageSize,
    pub scope: Scope,
    pub pages: u64,
    /// `None`: do not mount. `Some(None)`: mount at the default directory for the size.
    pub mount: Option<Option<String>>,
}

/// What `config` did; the caller reports it and then checks [`ConfigOutcome::check_granted`].
#[derive(Debug, Clone)]
pub struct ConfigOutcome {
    pub before: PoolCounters,
    pub after: PoolCounters,
    pub mount: Option<MountAction>,
}

impl ConfigOutcome {
    /// Fail if the kernel reserved fewer pages than asked for.
    pub fn check_granted(&self, req: &ConfigRequest) -> Result<(), Error> {
        pool::check_granted(req.size, req.scope, req.pages, self.after.persistent())
    }
}

/// Set the pool for one size (globally or on one node) and mount hugetlbfs for it if missing.
/// The mount happens even when the kernel granted fewer pages than asked, so the pages it did
/// grant are usable; the shortfall is reported by [`ConfigOutcome::check_granted`].
pub fn config(root: &Root, req: &ConfigRequest) -> Result<ConfigOutcome, Error> {
    let (before, after) = pool::set_pages(root, req.size, req.scope, req.pages)?;
    let mount = match &req.mount {
        Some(dir) if req.pages > 0 => Some(mounts::ensure_mounted(root, req.size, dir.as_deref())?),
        _ => None,
    };
    Ok(ConfigOutcome {
        before,
        after,
        mount,
    })
}

/// One size's result of `reset`.
#[derive(Debug, Clone)]
pub struct ResetOutcome {
    pub size: PageSize,
    pub before: PoolCounters,
    pub after: PoolCounters,
    /// Mount points removed (only with `unmount`).
    pub unmounted: Vec<String>,
    /// Pages of this size still reserved elsewhere, which kept its mounts in place.
    pub kept_mounts_for: Option<u64>,
}

/// Release every page of `sizes` (all sizes the scope has when `None`). Nothing is changed if
/// any of them has pages in use.
pub fn reset(
    root: &Root,
    sizes: Option<&[PageSize]>,
    scope: Scope,
    unmount: bool,
) -> Result<Vec<ResetOutcome>, Error> {
    let sizes = match sizes {
        Some(s) => s.to_vec(),
        None => pool::sizes_in_scope(root, scope)?,
    };
    for &size in &sizes {
        let counters = pool::read_counters(&pool::existing_pool_dir(root, size, scope)?)?;
        pool::check_shrink(size, scope, 0, &counters)?;
    }
    let mut outcomes = Vec::new();
    for size in sizes {
        let (before, after) = pool::set_pages(root, size, scope, 0)?;
        let mut outcome = ResetOutcome {
            size,
            before,
            after,
            unmounted: Vec::new(),
            kept_mounts_for: None,
        };
        if unmount {
            let global = pool::read_counters(&pool::existing_pool_dir(root, size, Scope::Global)?)?;
            if global.total == 0 {
                outcome.unmounted = mounts::unmount_size(root, size)?;
            } else {
                outcome.kept_mounts_for = Some(global.total);
            }
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}
