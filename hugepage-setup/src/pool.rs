//! The kernel's hugepage pools in sysfs: one per page size, globally and per NUMA node.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::units::PageSize;
use crate::{Error, Root};

const GLOBAL_POOLS: &str = "/sys/kernel/mm/hugepages";
const NODES: &str = "/sys/devices/system/node";

/// Where a pool lives: the system-wide one or one NUMA node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Node(u32),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("system-wide"),
            Scope::Node(n) => write!(f, "on NUMA node {n}"),
        }
    }
}

/// A pool's counters. `total` is `nr_hugepages`, which includes `surplus` pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PoolCounters {
    pub total: u64,
    pub free: u64,
    pub in_use: u64,
    pub surplus: u64,
}

impl PoolCounters {
    pub fn new(total: u64, free: u64, surplus: u64) -> Self {
        PoolCounters {
            total,
            free,
            in_use: total.saturating_sub(free),
            surplus,
        }
    }

    /// Persistent pages: what writing `nr_hugepages` asks for.
    pub fn persistent(&self) -> u64 {
        self.total.saturating_sub(self.surplus)
    }
}

/// The pool directory for a size and scope, whether or not it exists.
pub fn pool_dir(root: &Root, size: PageSize, scope: Scope) -> PathBuf {
    match scope {
        Scope::Global => root.path(GLOBAL_POOLS).join(size.sysfs_name()),
        Scope::Node(n) => node_dir(root, n).join("hugepages").join(size.sysfs_name()),
    }
}

fn node_dir(root: &Root, node: u32) -> PathBuf {
    root.path(NODES).join(format!("node{node}"))
}

fn check_node(root: &Root, scope: Scope) -> Result<(), Error> {
    if let Scope::Node(node) = scope {
        let path = node_dir(root, node);
        if !path.is_dir() {
            return Err(Error::NoSuchNode { node, path });
        }
    }
    Ok(())
}

/// The pool directory, or an error saying whether the node or the page size is missing.
pub fn existing_pool_dir(root: &Root, size: PageSize, scope: Scope) -> Result<PathBuf, Error> {
    check_node(root, scope)?;
    let dir = pool_dir(root, size, scope);
    if dir.is_dir() {
        return Ok(dir);
    }
    let supported = sizes_in_scope(root, scope)?;
    let supported = if supported.is_empty() {
        "none".to_owned()
    } else {
        supported
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::UnsupportedSize {
        size,
        path: dir,
        supported,
    })
}

/// Page sizes that have a pool in this scope, smallest first. A missing pool directory (kernel
/// without hugetlb) means none; a missing NUMA node is an error.
pub fn sizes_in_scope(root: &Root, scope: Scope) -> Result<Vec<PageSize>, Error> {
    check_node(root, scope)?;
    let dir = match scope {
        Scope::Global => root.path(GLOBAL_POOLS),
        Scope::Node(n) => node_dir(root, n).join("hugepages"),
    };
    let mut sizes: Vec<PageSize> = list_dir(&dir)?
        .iter()
        .filter_map(|name| PageSize::from_sysfs_name(name))
        .collect();
    sizes.sort();
    Ok(sizes)
}

/// NUMA nodes that sysfs lists, in order; none if there is no node directory.
pub fn numa_nodes(root: &Root) -> Result<Vec<u32>, Error> {
    let mut nodes: Vec<u32> = list_dir(&root.path(NODES))?
        .iter()
        .filter_map(|name| name.strip_prefix("node")?.parse().ok())
        .collect();
    nodes.sort_unstable();
    Ok(nodes)
}

fn list_dir(dir: &Path) -> Result<Vec<String>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn read_u64(path: &Path) -> Result<u64, Error> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.trim().parse().map_err(|_| Error::NotANumber {
        path: path.to_owned(),
        found: text.trim().to_owned(),
    })
}

/// Read a pool directory's counters.
pub fn read_counters(dir: &Path) -> Result<PoolCounters, Error> {
    Ok(PoolCounters::new(
        read_u64(&dir.join("nr_hugepages"))?,
        read_u64(&dir.join("free_hugepages"))?,
        read_u64(&dir.join("surplus_hugepages"))?,
    ))
}

/// Refuse to shrink a pool below the pages processes are using.
pub fn check_shrink(
    size: PageSize,
    scope: Scope,
    requested: u64,
    current: &PoolCounters,
) -> Result<(), Error> {
    if requested < current.in_use {
        return Err(Error::InUse {
            size,
            scope,
            requested,
            total: current.total,
            free: current.free,
            in_use: current.in_use,
        });
    }
    Ok(())
}

/// The kernel silently reserves fewer pages than written when it cannot find contiguous memory.
pub fn check_granted(
    size: PageSize,
    scope: Scope,
    requested: u64,
    granted: u64,
) -> Result<(), Error> {
    if granted < requested {
        return Err(Error::Shortfall {
            size,
            scope,
            requested,
            granted,
        });
    }
    Ok(())
}

/// Write `pages` to the pool's `nr_hugepages` (after the in-use check) and read it back.
/// Returns the counters before and after.
pub fn set_pages(
    root: &Root,
    size: PageSize,
    scope: Scope,
    pages: u64,
) -> Result<(PoolCounters, PoolCounters), Error> {
    let dir = existing_pool_dir(root, size, scope)?;
    let before = read_counters(&dir)?;
    check_shrink(size, scope, pages, &before)?;
    let nr = dir.join("nr_hugepages");
    fs::write(&nr, format!("{pages}\n")).map_err(|e| Error::io(&nr, e))?;
    Ok((before, read_counters(&dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_m() -> PageSize {
        PageSize::from_kb(2048).unwrap()
    }

    #[test]
    fn granted_check_passes_when_kernel_gives_enough() {
        assert!(check_granted(two_m(), Scope::Global, 64, 64).is_ok());
        assert!(check_granted(two_m(), Scope::Global, 0, 0).is_ok());
    }

    #[test]
    fn granted_check_reports_fragmentation_shortfall() {
        let err = check_granted(two_m(), Scope::Node(1), 1024, 700).unwrap_err();
        assert!(matches!(
            err,
            Error::Shortfall {
                requested: 1024,
                granted: 700,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("only 700 of the 1024 requested 2M hugepages on NUMA node 1"),
            "{msg}"
        );
        assert!(msg.contains("fragmented"), "{msg}");
    }

    #[test]
    fn shrink_check_names_the_numbers() {
        let current = PoolCounters::new(64, 24, 0);
        assert_eq!(current.in_use, 40);
        assert!(check_shrink(two_m(), Scope::Global, 40, &current).is_ok());
        let msg = check_shrink(two_m(), Scope::Global, 10, &current)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("to 10: 40 of 64 pages are in use (24 free)"),
            "{msg}"
        );
    }

    #[test]
    fn counters_tolerate_free_above_total() {
        // The kernel updates the counters separately; a torn read must not underflow.
        assert_eq!(PoolCounters::new(1, 2, 0).in_use, 0);
        assert_eq!(PoolCounters::new(10, 4, 3).persistent(), 7);
    }
}
