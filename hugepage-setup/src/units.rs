//! Page sizes and byte counts as operators write them (`2M`, `1G`, `512M`).

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::Error;

/// A hugepage size. Stored in kB because that is how sysfs names the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize {
    kb: u64,
}

impl PageSize {
    /// A size in kB; `None` unless it is a power of two of at least 64K (the smallest hugepage
    /// size any architecture has).
    pub fn from_kb(kb: u64) -> Option<Self> {
        (kb >= 64 && kb.is_power_of_two()).then_some(PageSize { kb })
    }

    /// A size in bytes; `None` unless [`PageSize::from_kb`] accepts it.
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        if bytes.is_multiple_of(1024) {
            Self::from_kb(bytes / 1024)
        } else {
            None
        }
    }

    pub fn kb(self) -> u64 {
        self.kb
    }

    pub fn bytes(self) -> u64 {
        self.kb * 1024
    }

    /// The pool directory name under `/sys/kernel/mm/hugepages`, e.g. `hugepages-2048kB`.
    pub fn sysfs_name(self) -> String {
        format!("hugepages-{}kB", self.kb)
    }

    /// Inverse of [`PageSize::sysfs_name`].
    pub fn from_sysfs_name(name: &str) -> Option<Self> {
        let kb = name.strip_prefix("hugepages-")?.strip_suffix("kB")?;
        Self::from_kb(kb.parse().ok()?)
    }

    /// Whole pages needed to hold `bytes`, rounded up.
    pub fn pages_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes())
    }
}

impl FromStr for PageSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        parse_bytes(s)
            .and_then(Self::from_bytes)
            .ok_or_else(|| Error::BadPageSize(s.to_owned()))
    }
}

/// Largest unit that divides exactly, as the kernel prints `pagesize=` in /proc/mounts.
impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut value = self.kb;
        let mut units = ["K", "M", "G", "T"].iter().peekable();
        let mut unit = "K";
        while let Some(&u) = units.next() {
            unit = u;
            if !value.is_multiple_of(1024) || units.peek().is_none() {
                break;
            }
            value /= 1024;
        }
        write!(f, "{value}{unit}")
    }
}

impl Serialize for PageSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parse `512M`, `2G`, `2GiB`, `1024kB`, `4096` (bytes). Units are binary and case-insensitive.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// clap value parser for `--memory`.
pub fn parse_memory(s: &str) -> Result<u64, Error> {
    parse_bytes(s).ok_or_else(|| Error::BadMemorySize(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> PageSize {
        s.parse().unwrap()
    }

    #[test]
    fn page_sizes_parse_and_print() {
        assert_eq!(size("2M").kb(), 2048);
        assert_eq!(size("1G").kb(), 1_048_576);
        assert_eq!(size("2048kB").kb(), 2048);
        assert_eq!(size("1gib").kb(), 1_048_576);
        assert_eq!(size("64K").to_string(), "64K");
        assert_eq!(size("2M").to_string(), "2M");
        assert_eq!(size("1024M").to_string(), "1G");
        assert_eq!(size("16G").to_string(), "16G");
        assert_eq!(size("2M").sysfs_name(), "hugepages-2048kB");
        assert_eq!(
            PageSize::from_sysfs_name("hugepages-1048576kB"),
            Some(size("1G"))
        );
        assert_eq!(PageSize::from_sysfs_name("hugepages-3kB"), None);
    }

    #[test]
    fn bad_page_sizes_are_errors() {
        for bad in [
            "3M",
            "0",
            "",
            "2X",
            "4K",
            "-2M",
            "2M2",
            "99999999999999999999G",
            "1.5G",
        ] {
            let err = bad.parse::<PageSize>().unwrap_err();
            assert!(
                matches!(err, Error::BadPageSize(ref s) if s == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn memory_sizes_convert_to_pages_rounding_up() {
        let two_m = size("2M");
        let one_g = size("1G");
        assert_eq!(two_m.pages_for(parse_memory("2G").unwrap()), 1024);
        assert_eq!(two_m.pages_for(parse_memory("512M").unwrap()), 256);
        assert_eq!(two_m.pages_for(parse_memory("5M").unwrap()), 3);
        assert_eq!(two_m.pages_for(parse_memory("1").unwrap()), 1);
        assert_eq!(two_m.pages_for(0), 0);
        assert_eq!(one_g.pages_for(parse_memory("1536M").unwrap()), 2);
        assert_eq!(one_g.pages_for(parse_memory("1T").unwrap()), 1024);
        assert!(parse_memory("2P").is_err());
        assert!(
            parse_memory("20000000T").is_err(),
            "overflow must be an error"
        );
    }
}
