//! Guest memory: the regions of a SET_MEM_TABLE, mapped by us, and bounds-checked translation.
//!
//! The guest owns this memory and changes it at any time, so nothing here hands out Rust
//! references into it: translation yields raw host pointers for ranges proven to lie inside one
//! mapping, and all reads and writes go through volatile/`copy_nonoverlapping` accessors. A range
//! that crosses a region boundary or lies outside every region is an error, never an access.
//!
//! A [`GuestMemory`] is shared (`Arc`) by the connection and every request that points into it, so
//! a SET_MEM_TABLE that replaces it, or a disconnect, unmaps it only when the last request that
//! still points into it has completed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Most regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
pub const MAX_REGIONS: usize = 8;

/// One region as the front-end described it, plus the fd it came with (kept for a handover).
#[derive(Debug)]
pub struct MemRegionInfo {
    /// Guest-physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The front-end's (QEMU's) virtual address of the first byte: ring addresses use these.
    pub user_addr: u64,
    /// Offset of the region in the fd.
    pub mmap_offset: u64,
    /// The memory fd (memfd or hugetlbfs file).
    pub fd: OwnedFd,
}

/// Why a region could not be mapped or an address not translated.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// Zero size, overflowing ranges, region past the end of its file.
    #[error("invalid region: {0}")]
    InvalidRegion(&'static str),
    /// mmap failed.
    #[error("mmap: {0}")]
    Map(io::Error),
    /// The range is not inside one region.
    #[error("address range {addr:#x}+{len} is not inside guest memory")]
    OutOfRange {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// A region and our mapping of it.
#[derive(Debug)]
pub struct MappedRegion {
    /// What the front-end sent.
    pub info: MemRegionInfo,
    map_base: *mut u8,
    map_len: usize,
}

impl MappedRegion {
    /// Maps `info` shared read-write.
    pub fn map(info: MemRegionInfo) -> Result<MappedRegion, MemError> {
        if info.size == 0 {
            return Err(MemError::InvalidRegion("zero size"));
        }
        let end_in_file = info
            .mmap_offset
            .checked_add(info.size)
            .ok_or(MemError::InvalidRegion("offset + size overflows"))?;
        if info.guest_phys_addr.checked_add(info.size).is_none()
            || info.user_addr.checked_add(info.size).is_none()
        {
            return Err(MemError::InvalidRegion("address + size overflows"));
        }
        let st = file_covers(&info.fd, end_in_file).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidInput => {
                MemError::InvalidRegion("region extends past the end of its file")
            }
            _ => MemError::Map(e),
        })?;
        // hugetlbfs mappings must be a whole number of huge pages (st_blksize) to be unmapped;
        // the tail past the region is never accessed (translation checks against `size`).
        let page = u64::try_from(st.st_blksize).unwrap_or(4096).max(4096);
        let map_len = if page.is_power_of_two() {
            end_in_file.div_ceil(page) * page
        } else {
            end_in_file
        };
        let map_len =
            usize::try_from(map_len).map_err(|_| MemError::InvalidRegion("region too large"))?;
        // Map from file offset 0 so the offset need not be page-aligned (as libvhost-user does).
        // SAFETY: a fresh shared mapping of an fd we own; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                info.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map(io::Error::last_os_error()));
        }
        Ok(MappedRegion {
            info,
            map_base: p.cast(),
            map_len,
        })
    }

    fn host_base(&self) -> *mut u8 {
        // mmap_offset < map_len by construction (size > 0), so this stays inside the mapping.
        self.map_base.wrapping_add(self.info.mmap_offset as usize)
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: map_base/map_len describe exactly the mapping made in `map`; nothing refers to
        // it any more (requests hold the owning GuestMemory alive while they use it).
        unsafe { libc::munmap(self.map_base.cast(), self.map_len) };
    }
}

/// All mapped regions of one memory table.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<MappedRegion>,
}

// SAFETY: the raw pointers refer to shared mappings owned by this value; they are valid from any
// thread, and every access through them is bounds-checked and volatile.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; &GuestMemory only translates and copies.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// A memory table from already-mapped regions.
    pub fn new(regions: Vec<MappedRegion>) -> Arc<GuestMemory> {
        Arc::new(GuestMemory { regions })
    }

    /// The regions (for a handover: their fds and addresses).
    pub fn regions(&self) -> &[MappedRegion] {
        &self.regions
    }

    /// Host pointer for guest-physical `[gpa, gpa + len)`, which must lie inside one region.
    pub fn translate_gpa(&self, gpa: u64, len: u64) -> Result<*mut u8, MemError> {
        for r in &self.regions {
            if let Some(p) = Self::within(r, r.info.guest_phys_addr, gpa, len) {
                return Ok(p);
            }
        }
        Err(MemError::OutOfRange { addr: gpa, len })
    }

    /// Host pointer for front-end virtual `[uva, uva + len)` (ring addresses), inside one region.
    pub fn translate_uva(&self, uva: u64, len: u64) -> Result<*mut u8, MemError> {
        for r in &self.regions {
            if let Some(p) = Self::within(r, r.info.user_addr, uva, len) {
                return Ok(p);
            }
        }
        Err(MemError::OutOfRange { addr: uva, len })
    }

    fn within(r: &MappedRegion, base: u64, addr: u64, len: u64) -> Option<*mut u8> {
        let off = addr.checked_sub(base)?;
        if off >= r.info.size || len > r.info.size - off {
            return None;
        }
        Some(r.host_base().wrapping_add(off as usize))
    }
}

/// `fstat`s `fd` and checks that a regular file (memfd, hugetlbfs) reaches `end`: a mapping past
/// the end of a file faults (SIGBUS) on access, so such a region is refused up front
/// (`InvalidInput`).
fn file_covers(fd: &OwnedFd, end: u64) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is valid for writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && (st.st_size as u64) < end {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "region extends past the end of its file",
        ));
    }
    Ok(st)
}

/// Creates an anonymous shared-memory file of `len` bytes (zero-filled).
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: cname is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd to us alone.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A shared mapping of a whole fd range, unmapped on drop (the inflight region).
#[derive(Debug)]
pub struct SharedMapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: owns its mapping; accesses are volatile and bounds-checked by the users.
unsafe impl Send for SharedMapping {}
// SAFETY: &SharedMapping only exposes the base pointer and length; writes through it are
// volatile and made by the one thread that owns the connection.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from `offset` (page-aligned), shared read-write.
    pub fn map(fd: &OwnedFd, offset: u64, len: u64) -> io::Result<SharedMapping> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        if len == 0 || !offset.is_multiple_of(4096) {
            return Err(io::Error::other("bad inflight mapping size/offset"));
        }
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::other("inflight region size overflows"))?;
        file_covers(fd, end)?;
        // SAFETY: a fresh shared mapping of an fd we hold.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            base: p.cast(),
            len,
        })
    }

    /// Start of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `map`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Volatile accessors for little-endian (x86: native) guest-memory fields. Callers pass pointers
/// obtained from a translation covering the accessed bytes.
///
/// The driver updates ring indices with single naturally-aligned stores while we poll them, so
/// an aligned field is read and written with one load or store of its full width (atomic on
/// x86). A volatile copy of a byte array is *not* that: LLVM splits it into byte loads, and a
/// poll that read the low byte of avail idx 0x37FE and the high byte of 0x3801 saw 0x38FE, "a
/// queue ahead", and reset the device. Misaligned fields (the spec forbids them for rings) fall
/// back to an unaligned copy.
pub mod access {
    macro_rules! accessors {
        ($($r:ident, $w:ident, $t:ty, $n:literal;)*) => {$(
            #[doc = concat!("Reads a little-endian ", stringify!($t), ".")]
            ///
            /// # Safety
            #[doc = concat!("`p..p+", $n, "` must be inside a live mapping.")]
            #[inline]
            pub unsafe fn $r(p: *const u8) -> $t {
                let p = p.cast::<$t>();
                if p.is_aligned() {
                    // SAFETY: caller guarantees the range is mapped; p is aligned for the type,
                    // so this is one full-width load.
                    <$t>::from_le(unsafe { std::ptr::read_volatile(p) })
                } else {
                    // SAFETY: caller guarantees the range is mapped; unaligned-safe copy.
                    <$t>::from_le(unsafe { std::ptr::read_unaligned(p) })
                }
            }

            #[doc = concat!("Writes a little-endian ", stringify!($t), ".")]
            ///
            /// # Safety
            #[doc = concat!("`p..p+", $n, "` must be inside a live mapping.")]
            #[inline]
            pub unsafe fn $w(p: *mut u8, v: $t) {
                let p = p.cast::<$t>();
                if p.is_aligned() {
                    // SAFETY: caller guarantees the range is mapped; aligned full-width store.
                    unsafe { std::ptr::write_volatile(p, v.to_le()) }
                } else {
                    // SAFETY: caller guarantees the range is mapped; unaligned-safe copy.
                    unsafe { std::ptr::write_unaligned(p, v.to_le()) }
                }
            }
        )*};
    }
    accessors! {
        r16, w16, u16, 2;
        r32, w32, u32, 4;
        r64, w64, u64, 8;
    }
}

#[cfg(test)]
mod tests {
    use super::access;
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
    use std::sync::Arc;

    /// The driver stores ring indices with single 16-bit stores while we poll them: a load split
    /// into bytes can see the low byte of one index and the high byte of the next (0x37FE/0x3801
    /// read as 0x38FE, "a queue ahead"). Our loads and stores of ring fields must be whole.
    #[test]
    fn ring_field_accesses_never_tear() {
        let word = Arc::new(AtomicU32::new(u32::from(0x00FFu16)));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (0x00FFu16, 0x0100u16);
        let started = Arc::new(AtomicBool::new(false));
        let window = std::time::Duration::from_millis(1500);
        let writer = {
            let (word, stop, started) = (word.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                // SAFETY: the u32 is 4-aligned, so its first two bytes are a valid AtomicU16.
                let idx = unsafe { &*(word.as_ptr().cast::<AtomicU16>()) };
                started.store(true, Ordering::Release);
                while !stop.load(Ordering::Relaxed) {
                    idx.store(a, Ordering::Release);
                    idx.store(b, Ordering::Release);
                }
            })
        };
        let p = word.as_ptr().cast::<u8>();
        let mut torn = 0u64;
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let t0 = std::time::Instant::now();
        while t0.elapsed() < window {
            // SAFETY: p points at the live u32 (4 bytes).
            let v = unsafe { access::r16(p) };
            if v != a && v != b {
                torn += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(torn, 0, "r16 returned {torn} torn values");

        // Our stores, seen by a whole-word reader.
        let stop2 = Arc::new(AtomicBool::new(false));
        let reader = {
            let (word, stop2) = (word.clone(), stop2.clone());
            std::thread::spawn(move || {
                // SAFETY: as above.
                let idx = unsafe { &*(word.as_ptr().cast::<AtomicU16>()) };
                let mut bad = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    let v = idx.load(Ordering::Acquire);
                    if v != a && v != b {
                        bad += 1;
                    }
                }
                bad
            })
        };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < window {
            // SAFETY: p points at the live u32.
            unsafe {
                access::w16(p, a);
                access::w16(p, b);
            }
        }
        stop2.store(true, Ordering::Relaxed);
        assert_eq!(reader.join().unwrap(), 0, "w16 stores were seen torn");
    }
}
