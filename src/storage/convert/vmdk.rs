//! A minimal reader for hosted sparse vmdk extents (`monolithicSparse`, the "KDMV" header, what
//! plain `qemu-img convert -O vmdk` makes), which imago 0.2.6 cannot read.
//!
//! Layout (VMware "Virtual Disk Format 1.1", hosted sparse extent): a 512-byte header (little
//! endian) giving the capacity and the grain size in sectors, the number of entries per grain
//! table (GT) and the sector of the grain directory (GD). The GD holds one `u32` sector offset per
//! GT (0 = the whole GT is unallocated); a GT holds one `u32` sector offset per grain (0 =
//! unallocated, reads as zeros; 1 = a zeroed grain when the header's zeroed-grain flag is set).
//!
//! Supported: uncompressed grains, no parent. Refused with a clear error: compressed grains and
//! streamOptimized (markers, GD at the end of the file), a parent (a child in a snapshot chain),
//! and anything that does not fit in the file. Every table is read and bounds-checked at open, so a
//! truncated or corrupt image fails there, never in the middle of a conversion; after that a read
//! is a table lookup and a `pread`. The grain table costs 4 bytes of memory per grain (64 MiB for a
//! 1 TiB disk with 64 KiB grains).

use std::fs::File;
use std::io::{Error, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 4] = b"KDMV";
const SECTOR: u64 = 512;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// streamOptimized images put the GD after the data ("GD at end").
const GD_AT_END: u64 = u64::MAX;
/// Largest grain accepted (qemu allows up to 2 GiB; real images use 64 KiB).
const MAX_GRAIN_SECTORS: u64 = (64 << 20) / SECTOR;
/// Largest descriptor read (to find a parent reference).
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// Where one grain's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Reads as zeros.
    Zero,
    /// Data at this byte offset in the file.
    Data(u64),
}

/// An opened, fully checked sparse extent; `read_at` takes `&self` (shareable between threads).
#[derive(Debug)]
pub struct SparseVmdk {
    file: File,
    size: u64,
    grain: u64,
    /// Sector offset per grain (0 = zero).
    table: Vec<u32>,
    zero_flag: bool,
}

fn corrupt(m: String) -> Error {
    Error::new(ErrorKind::InvalidData, m)
}

fn le32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn read_exact_at(f: &File, len: u64, off: u64, flen: u64, what: &str) -> Result<Vec<u8>, Error> {
    if off.checked_add(len).is_none_or(|e| e > flen) {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "vmdk {what} at {off}+{len} is beyond the end of the file ({flen} bytes): \
                 truncated image"
            ),
        ));
    }
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, off)?;
    Ok(v)
}

impl SparseVmdk {
    /// Opens and checks a hosted sparse extent.
    pub fn open(path: &Path) -> Result<SparseVmdk, Error> {
        let file = File::open(path)?;
        Self::from_file(file)
    }

    /// Parses an already opened file (read-only use).
    pub fn from_file(file: File) -> Result<SparseVmdk, Error> {
        let flen = file.metadata()?.len();
        let h = read_exact_at(&file, SECTOR, 0, flen, "header")?;
        if &h[0..4] != MAGIC {
            return Err(corrupt("not a sparse vmdk extent (no KDMV magic)".into()));
        }
        let version = le32(&h, 4);
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12);
        let grain_sectors = le64(&h, 20);
        let desc_off = le64(&h, 28);
        let desc_size = le64(&h, 36);
        let gtes = u64::from(le32(&h, 44));
        let gd_off = le64(&h, 56);
        let compress = u16::from_le_bytes([h[77], h[78]]);
        if !(1..=3).contains(&version) {
            return Err(corrupt(format!("unsupported vmdk version {version}")));
        }
        if flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0 || compress != 0 || gd_off == GD_AT_END {
            return Err(corrupt(
                "compressed / streamOptimized vmdk is not supported; convert it with \
                 `qemu-img convert -O vmdk` (monolithicSparse) or to qcow2 first"
                    .into(),
            ));
        }
        if grain_sectors == 0
            || !grain_sectors.is_power_of_two()
            || grain_sectors > MAX_GRAIN_SECTORS
        {
            return Err(corrupt(format!(
                "bad vmdk grain size {grain_sectors} sectors"
            )));
        }
        if gtes == 0 || gtes > 1 << 16 {
            return Err(corrupt(format!("bad vmdk grain table size {gtes}")));
        }
        let size = capacity
            .checked_mul(SECTOR)
            .filter(|s| *s < 1 << 62)
            .ok_or_else(|| corrupt(format!("bad vmdk capacity {capacity}")))?;
        let grain = grain_sectors * SECTOR;
        let ngrains = size.div_ceil(grain);
        // The table needs 4 bytes per grain and every GT lies in the file: a GT count the file
        // cannot hold is corrupt, whatever the header claims.
        let ngts = ngrains.div_ceil(gtes);
        if ngts.saturating_mul(gtes * 4) > flen.saturating_mul(2) + (1 << 20) {
            return Err(corrupt(format!(
                "vmdk capacity {size} needs {ngts} grain tables; the file ({flen} bytes) \
                 cannot hold them"
            )));
        }
        if desc_size > 0 {
            let n = desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
            let off = desc_off.saturating_mul(SECTOR);
            let d = read_exact_at(&file, n, off, flen, "descriptor")?;
            let text = String::from_utf8_lossy(&d);
            let parent = text.lines().any(|l| {
                let l = l.trim();
                l.starts_with("parentFileNameHint")
                    || (l.starts_with("parentCID")
                        && !l
                            .trim_end_matches('"')
                            .to_ascii_lowercase()
                            .ends_with("ffffffff"))
            });
            if parent {
                return Err(corrupt(
                    "vmdk with a parent (snapshot chain) is not supported".into(),
                ));
            }
        }
        let gd_bytes = read_exact_at(
            &file,
            ngts * 4,
            gd_off.saturating_mul(SECTOR),
            flen,
            "grain directory",
        )?;
        let mut table = Vec::with_capacity(ngrains as usize);
        let zero_flag = flags & FLAG_ZERO_GRAIN != 0;
        for t in 0..ngts {
            let gt_sector = u64::from(le32(&gd_bytes, (t * 4) as usize));
            let n = gtes.min(ngrains - t * gtes);
            if gt_sector == 0 {
                table.extend(std::iter::repeat_n(0u32, n as usize));
                continue;
            }
            let gt = read_exact_at(
                &file,
                gtes * 4,
                gt_sector.saturating_mul(SECTOR),
                flen,
                "grain table",
            )?;
            for i in 0..n {
                let e = le32(&gt, (i * 4) as usize);
                let g = t * gtes + i;
                if e > 1 || (e == 1 && !zero_flag) {
                    let off = u64::from(e) * SECTOR;
                    let want = grain.min(size - g * grain);
                    if off + want > flen {
                        return Err(Error::new(
                            ErrorKind::UnexpectedEof,
                            format!(
                                "vmdk grain {g} at {off}+{want} is beyond the end of the file \
                                 ({flen} bytes): truncated image"
                            ),
                        ));
                    }
                }
                table.push(e);
            }
        }
        Ok(SparseVmdk {
            file,
            size,
            grain,
            table,
            zero_flag,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per grain.
    pub fn grain_size(&self) -> u64 {
        self.grain
    }

    /// Where grain `g` is (`Zero` beyond the end).
    pub fn grain(&self, g: u64) -> Grain {
        match self.table.get(g as usize).copied() {
            None | Some(0) => Grain::Zero,
            Some(1) if self.zero_flag => Grain::Zero,
            Some(s) => Grain::Data(u64::from(s) * SECTOR),
        }
    }

    /// Whether `[offset, offset + len)` reads as zeros without looking at data.
    pub fn maps_to_zero(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size {
            return true;
        }
        let end = (offset + len).min(self.size);
        (offset / self.grain..end.div_ceil(self.grain)).all(|g| self.grain(g) == Grain::Zero)
    }

    /// Fills `buf` with the disk's bytes at `offset` (zeros beyond the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = buf.len() - done;
            if pos >= self.size {
                buf[done..].fill(0);
                break;
            }
            let g = pos / self.grain;
            let within = pos % self.grain;
            let n = ((self.grain - within).min(self.size - pos) as usize).min(rest);
            let dst = &mut buf[done..done + n];
            match self.grain(g) {
                Grain::Zero => dst.fill(0),
                Grain::Data(at) => self.file.read_exact_at(dst, at + within)?,
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(capacity: u64, grain: u64, gd: u64, flags: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&flags.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&grain.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd.to_le_bytes());
        h
    }

    /// A tiny valid image: 4 grains of 8 sectors, GD at sector 1, GT at sector 2, grain 1 data
    /// at sector 8, grain 2 zeroed (flag), grains 0 and 3 unallocated.
    fn tiny() -> Vec<u8> {
        let mut img = header(32, 8, 1, FLAG_ZERO_GRAIN);
        img.resize(8 * 512 + 8 * 512, 0);
        img[512..516].copy_from_slice(&2u32.to_le_bytes());
        let gt = 2 * 512;
        img[gt + 4..gt + 8].copy_from_slice(&8u32.to_le_bytes());
        img[gt + 8..gt + 12].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in img[8 * 512..].iter_mut().enumerate() {
            *b = (i % 250) as u8 + 1;
        }
        img
    }

    fn open_bytes(name: &str, b: &[u8]) -> Result<SparseVmdk, Error> {
        let d = std::env::temp_dir().join(format!("hp-vmdk-{}-{name}", std::process::id()));
        std::fs::write(&d, b).unwrap();
        let r = SparseVmdk::open(&d);
        let _ = std::fs::remove_file(&d);
        r
    }

    #[test]
    fn reads_a_tiny_image() {
        let img = tiny();
        let v = open_bytes("tiny", &img).unwrap();
        assert_eq!(v.size(), 32 * 512);
        assert_eq!(v.grain(1), Grain::Data(8 * 512));
        assert_eq!(v.grain(2), Grain::Zero);
        assert!(v.maps_to_zero(0, 4096) && !v.maps_to_zero(0, 4097));
        let mut buf = vec![0xffu8; 32 * 512 + 100];
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(&buf[4096..8192], &img[8 * 512..]);
        assert!(buf[8192..].iter().all(|&b| b == 0));
        let mut mid = vec![0u8; 100];
        v.read_at(&mut mid, 4000).unwrap();
        assert_eq!(&mid[96..], &img[8 * 512..8 * 512 + 4]);
    }

    #[test]
    fn bad_images_give_errors_never_panics() {
        let good = tiny();
        // Every truncation, and every single-byte corruption of the header and tables.
        for n in 0..good.len() {
            let _ = open_bytes("trunc", &good[..n]).map(|v| {
                let mut b = vec![0u8; 4096];
                let _ = v.read_at(&mut b, 0);
            });
        }
        for i in 0..3 * 512 {
            for x in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = x;
                if let Ok(v) = open_bytes("flip", &b) {
                    let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
                    let _ = v.read_at(&mut buf, 0);
                }
            }
        }
        assert!(open_bytes("t1", &good[..8 * 512 + 100])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let e = open_bytes("c", &header(32, 8, 1, FLAG_COMPRESSED)).unwrap_err();
        assert!(e.to_string().contains("streamOptimized"), "{e}");
        let e = open_bytes("s", &header(32, 8, GD_AT_END, 0)).unwrap_err();
        assert!(e.to_string().contains("streamOptimized"), "{e}");
        let e = open_bytes("g", &header(32, 3, 1, 0)).unwrap_err();
        assert!(e.to_string().contains("grain size"), "{e}");
        let e = open_bytes("huge", &header(u64::MAX / 2, 8, 1, 0)).unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
    }
}
