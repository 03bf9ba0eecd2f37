//! hugetlbfs mounts: read from /proc/mounts; created with mount(2), or, in a fake root, recorded
//! by appending a line to `<root>/proc/mounts` (and unmounted by removing that line).

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::units::{parse_bytes, PageSize};
use crate::{Error, Root};

const MOUNTS: &str = "/proc/mounts";
const MEMINFO: &str = "/proc/meminfo";
const DEFAULT_MOUNT_DIR: &str = "/dev/hugepages";

/// One line of /proc/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub path: String,
    pub fstype: String,
    pub options: String,
}

impl MountEntry {
    /// Parse `source target fstype options freq passno`; `None` for a malformed line.
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let path = unescape(fields.next()?);
        let fstype = fields.next()?.to_owned();
        let options = fields.next().unwrap_or("").to_owned();
        Some(MountEntry {
            path,
            fstype,
            options,
        })
    }

    /// The page size of a hugetlbfs mount: its `pagesize=` option, else the kernel default.
    pub fn hugetlbfs_page_size(&self, default: Option<PageSize>) -> Option<PageSize> {
        if self.fstype != "hugetlbfs" {
            return None;
        }
        let option = self
            .options
            .split(',')
            .find_map(|o| o.strip_prefix("pagesize="));
        match option {
            Some(value) => parse_bytes(value).and_then(PageSize::from_bytes),
            None => default,
        }
    }
}

/// A hugetlbfs mount point and the page size it serves (`None` if that cannot be told).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugetlbfsMount {
    pub path: String,
    pub page_size: Option<PageSize>,
}

/// What `ensure_mounted` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountAction {
    /// A hugetlbfs mount for the size already existed here.
    AlreadyMounted(String),
    /// Mounted here (recorded only, in a fake root).
    Mounted(String),
}

/// /proc/mounts octal-escapes space, tab, newline and backslash in paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", u32::from(c))),
            _ => out.push(c),
        }
    }
    out
}

fn read_optional(path: &Path) -> Result<String, Error> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The kernel's default hugepage size (`Hugepagesize` in /proc/meminfo), if it has one.
pub fn default_page_size(root: &Root) -> Result<Option<PageSize>, Error> {
    let text = read_optional(&root.path(MEMINFO))?;
    Ok(text.lines().find_map(|line| {
        let kb = line
            .strip_prefix("Hugepagesize:")?
            .trim()
            .strip_suffix("kB")?;
        PageSize::from_kb(kb.trim().parse().ok()?)
    }))
}

/// Every line of /proc/mounts (none if a fake root has no such file).
pub fn mount_table(root: &Root) -> Result<Vec<MountEntry>, Error> {
    let text = read_optional(&root.path(MOUNTS))?;
    Ok(text.lines().filter_map(MountEntry::parse).collect())
}

/// The hugetlbfs mounts, in /proc/mounts order.
pub fn hugetlbfs_mounts(root: &Root) -> Result<Vec<HugetlbfsMount>, Error> {
    let default = default_page_size(root)?;
    Ok(mount_table(root)?
        .into_iter()
        .filter(|m| m.fstype == "hugetlbfs")
        .map(|m| HugetlbfsMount {
            page_size: m.hugetlbfs_page_size(default),
            path: m.path,
        })
        .collect())
}

/// `/dev/hugepages` for the default size, `/dev/hugepages-1G` (etc.) for the others, so a
/// second size never hides the first.
pub fn default_mount_dir(size: PageSize, default: Option<PageSize>) -> String {
    if Some(size) == default {
        DEFAULT_MOUNT_DIR.to_owned()
    } else {
        format!("{DEFAULT_MOUNT_DIR}-{size}")
    }
}

/// Mount hugetlbfs for `size` unless some mount already serves it. `dir` overrides the default
/// mount point. The `pagesize=` option is always passed: harmless for the default size, and
/// explicit in /proc/mounts.
pub fn ensure_mounted(
    root: &Root,
    size: PageSize,
    dir: Option<&str>,
) -> Result<MountAction, Error> {
    let default = default_page_size(root)?;
    let table = mount_table(root)?;
    if let Some(m) = table
        .iter()
        .find(|m| m.hugetlbfs_page_size(default) == Some(size))
    {
        return Ok(MountAction::AlreadyMounted(m.path.clone()));
    }
    let path = match dir {
        Some(d) => {
            let trimmed = d.trim_end_matches('/');
            if !d.starts_with('/') || trimmed.is_empty() || d.contains('\0') {
                return Err(Error::BadMountDir(d.to_owned()));
            }
            trimmed.to_owned()
        }
        None => default_mount_dir(size, default),
    };
    if let Some(m) = table.iter().rev().find(|m| m.path == path) {
        return Err(Error::MountPointTaken {
            path: path.into(),
            fstype: m.fstype.clone(),
        });
    }
    let options = format!("pagesize={size}");
    if root.is_fake() {
        record_mount(root, &path, &options)?;
    } else {
        mount_hugetlbfs(&path, &options)?;
    }
    Ok(MountAction::Mounted(path))
}

fn record_mount(root: &Root, path: &str, options: &str) -> Result<(), Error> {
    let file = root.path(MOUNTS);
    let mut text = read_optional(&file)?;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "hugetlbfs {} hugetlbfs rw,relatime,{options} 0 0\n",
        escape(path)
    ));
    write_file(&file, &text)
}

fn write_file(file: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = file.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    fs::File::create(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(file, e))
}

fn c_string(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::BadMountDir(s.to_owned()))
}

fn mount_hugetlbfs(path: &str, options: &str) -> Result<(), Error> {
    let mount_error = |source| Error::Mount {
        action: "mount",
        path: path.into(),
        source,
    };
    fs::create_dir_all(path).map_err(mount_error)?;
    let target = c_string(path)?;
    let data = c_string(options)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, and mount(2)
    // only reads them; hugetlbfs takes its `data` as a string of options.
    let rc = unsafe {
        libc::mount(
            c"hugetlbfs".as_ptr(),
            target.as_ptr(),
            c"hugetlbfs".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(mount_error(io::Error::last_os_error()));
    }
    Ok(())
}

/// Unmount every hugetlbfs mount serving `size`, newest first; returns the mount points.
pub fn unmount_size(root: &Root, size: PageSize) -> Result<Vec<String>, Error> {
    let default = default_page_size(root)?;
    let serves_size = |m: &MountEntry| m.hugetlbfs_page_size(default) == Some(size);
    let mut removed = Vec::new();
    if root.is_fake() {
        let file = root.path(MOUNTS);
        let mut kept = String::new();
        for line in read_optional(&file)?.lines() {
            match MountEntry::parse(line).filter(serves_size) {
                Some(m) => removed.push(m.path),
                None => {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        if !removed.is_empty() {
            write_file(&file, &kept)?;
        }
        return Ok(removed);
    }
    for m in mount_table(root)?.into_iter().rev().filter(serves_size) {
        let target = c_string(&m.path)?;
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            return Err(Error::Mount {
                action: "unmount",
                path: m.path.into(),
                source: io::Error::last_os_error(),
            });
        }
        removed.push(m.path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hugetlbfs_lines_and_page_sizes() {
        let two_m = PageSize::from_kb(2048);
        let one_g = PageSize::from_kb(1 << 20);
        let line = |l: &str| MountEntry::parse(l).unwrap();
        let a = line("hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0");
        assert_eq!(a.path, "/dev/hugepages");
        assert_eq!(a.hugetlbfs_page_size(None), two_m);
        let b = line("none /mnt/huge\\0401G hugetlbfs rw,pagesize=1024M 0 0");
        assert_eq!(b.path, "/mnt/huge 1G");
        assert_eq!(b.hugetlbfs_page_size(two_m), one_g);
        let c = line("nodev /mnt/h hugetlbfs rw 0 0");
        assert_eq!(
            c.hugetlbfs_page_size(one_g),
            one_g,
            "no option: default size"
        );
        let d = line("proc /proc proc rw 0 0");
        assert_eq!(d.hugetlbfs_page_size(two_m), None);
        assert_eq!(MountEntry::parse("garbage"), None);
    }

    #[test]
    fn escape_round_trips() {
        let path = "/mnt/a b\\c\td";
        assert_eq!(escape(path), "/mnt/a\\040b\\134c\\011d");
        assert_eq!(unescape(&escape(path)), path);
        assert_eq!(unescape("\\9xx\\"), "\\9xx\\", "not an escape: kept");
    }

    #[test]
    fn default_mount_dir_per_size() {
        let two_m = PageSize::from_kb(2048);
        let one_g = PageSize::from_kb(1 << 20).unwrap();
        assert_eq!(default_mount_dir(one_g, two_m), "/dev/hugepages-1G");
        assert_eq!(default_mount_dir(one_g, Some(one_g)), "/dev/hugepages");
    }
}
