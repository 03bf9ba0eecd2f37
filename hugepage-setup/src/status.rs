//! `status`: the pools, the hugetlbfs mounts and the processes holding hugepage files.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::mounts::{self, HugetlbfsMount};
use crate::pool::{self, PoolCounters, Scope};
use crate::units::PageSize;
use crate::{Error, Root};

const PROC: &str = "/proc";

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub default_page_size: Option<PageSize>,
    pub sizes: Vec<SizeStatus>,
    pub mounts: Vec<HugetlbfsMount>,
    pub holders: Vec<Holder>,
}

/// One page size's pool, system-wide and per NUMA node.
#[derive(Debug, Serialize)]
pub struct SizeStatus {
    pub page_size: PageSize,
    pub page_size_kb: u64,
    pub global: PoolCounters,
    pub nodes: Vec<NodeCounters>,
}

#[derive(Debug, Serialize)]
pub struct NodeCounters {
    pub node: u32,
    #[serde(flatten)]
    pub counters: PoolCounters,
}

/// A process with files of a hugetlbfs mount mapped or open.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// Distinct hugetlbfs files, mapped or open.
    pub files: usize,
}

/// Read the whole picture.
pub fn gather(root: &Root) -> Result<Status, Error> {
    let nodes = pool::numa_nodes(root)?;
    let mut sizes = Vec::new();
    for page_size in pool::sizes_in_scope(root, Scope::Global)? {
        let global = pool::read_counters(&pool::pool_dir(root, page_size, Scope::Global))?;
        let mut per_node = Vec::new();
        for &node in &nodes {
            let dir = pool::pool_dir(root, page_size, Scope::Node(node));
            if dir.is_dir() {
                let counters = pool::read_counters(&dir)?;
                per_node.push(NodeCounters { node, counters });
            }
        }
        sizes.push(SizeStatus {
            page_size,
            page_size_kb: page_size.kb(),
            global,
            nodes: per_node,
        });
    }
    let mounts = mounts::hugetlbfs_mounts(root)?;
    let mount_paths: Vec<&str> = mounts.iter().map(|m| m.path.as_str()).collect();
    let holders = scan_holders(root, &mount_paths)?;
    Ok(Status {
        default_page_size: mounts::default_page_size(root)?,
        sizes,
        mounts,
        holders,
    })
}

/// Processes whose maps or open fds point into one of `mounts`. Processes exit and hide their
/// files from other users while we scan, so any per-process read error just skips what it hid.
pub fn scan_holders(root: &Root, mounts: &[&str]) -> Result<Vec<Holder>, Error> {
    if mounts.is_empty() {
        return Ok(Vec::new());
    }
    let proc_dir = root.path(PROC);
    let entries = match fs::read_dir(&proc_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&proc_dir, e)),
    };
    let mut holders: Vec<Holder> = entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            holder(&entry.path(), pid, mounts)
        })
        .collect();
    holders.sort_by_key(|h| h.pid);
    Ok(holders)
}

fn holder(dir: &Path, pid: u32, mounts: &[&str]) -> Option<Holder> {
    let mut files = BTreeSet::new();
    if let Ok(maps) = fs::read(dir.join("maps")) {
        for line in String::from_utf8_lossy(&maps).lines() {
            if let Some(path) = maps_path(line).filter(|p| under_any(p, mounts)) {
                files.insert(path.to_owned());
            }
        }
    }
    if let Ok(fds) = fs::read_dir(dir.join("fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                let path = strip_deleted(&target);
                if under_any(path, mounts) {
                    files.insert(path.to_owned());
                }
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    // comm is world-readable: failing to read it means the process is gone.
    let comm = fs::read_to_string(dir.join("comm")).ok()?;
    Some(Holder {
        pid,
        comm: comm.trim_end().to_owned(),
        files: files.len(),
    })
}

/// The path of a /proc/PID/maps line (`addr perms offset dev inode   path`), without the
/// ` (deleted)` mark DPDK's unlinked hugepage files carry.
fn maps_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(' ')?..];
    }
    let path = rest.trim_start();
    (!path.is_empty()).then(|| strip_deleted(path))
}

fn strip_deleted(path: &str) -> &str {
    path.strip_suffix(" (deleted)").unwrap_or(path)
}

fn under_any(path: &str, mounts: &[&str]) -> bool {
    mounts.iter().any(|m| {
        path.strip_prefix(m)
            .is_some_and(|rest| rest.starts_with('/') || m.ends_with('/'))
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.default_page_size {
            Some(size) => writeln!(f, "default hugepage size: {size}")?,
            None => writeln!(
                f,
                "default hugepage size: unknown (no Hugepagesize in meminfo)"
            )?,
        }
        if self.sizes.is_empty() {
            writeln!(f, "no hugepage pools (kernel without hugetlbfs support?)")?;
        } else {
            writeln!(
                f,
                "{:<6} {:<8} {:>8} {:>8} {:>8} {:>8}",
                "size", "scope", "total", "free", "in use", "surplus"
            )?;
        }
        let row = |f: &mut fmt::Formatter<'_>, size: &str, scope: &str, c: &PoolCounters| {
            writeln!(
                f,
                "{size:<6} {scope:<8} {:>8} {:>8} {:>8} {:>8}",
                c.total, c.free, c.in_use, c.surplus
            )
        };
        for s in &self.sizes {
            row(f, &s.page_size.to_string(), "global", &s.global)?;
            for n in &s.nodes {
                row(f, "", &format!("node{}", n.node), &n.counters)?;
            }
        }
        writeln!(f, "hugetlbfs mounts:")?;
        if self.mounts.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for m in &self.mounts {
            match m.page_size {
                Some(size) => writeln!(f, "  {} (pagesize {size})", m.path)?,
                None => writeln!(f, "  {} (pagesize unknown)", m.path)?,
            }
        }
        writeln!(f, "processes holding hugepage files:")?;
        if self.holders.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for h in &self.holders {
            writeln!(f, "  pid {} ({}): {} file(s)", h.pid, h.comm, h.files)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_paths() {
        let line = "7f0000000000-7f0000200000 rw-s 00000000 00:2f 12345                      /dev/hugepages/rtemap_0 (deleted)";
        assert_eq!(maps_path(line), Some("/dev/hugepages/rtemap_0"));
        let spaced = "7f00-7f01 r--p 00000000 08:01 99   /opt/my dir/lib.so";
        assert_eq!(maps_path(spaced), Some("/opt/my dir/lib.so"));
        assert_eq!(maps_path("7f00-7f01 rw-p 00000000 00:00 0 "), None);
        assert_eq!(maps_path("short line"), None);
    }

    #[test]
    fn paths_under_mounts() {
        let mounts = ["/dev/hugepages", "/mnt/h1G"];
        assert!(under_any("/dev/hugepages/rtemap_0", &mounts));
        assert!(under_any("/mnt/h1G/x/y", &mounts));
        assert!(!under_any("/dev/hugepages-1G/rtemap_0", &mounts));
        assert!(!under_any("/dev/hugepages", &mounts));
        assert!(!under_any("/usr/lib/libc.so", &mounts));
    }
}
