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
pub mod access {
    /// Reads a u16.
    ///
    /// # Safety
    /// `p..p+2` must be inside a live mapping.
    #[inline]
    pub unsafe fn r16(p: *const u8) -> u16 {
        // SAFETY: caller guarantees the range is mapped; unaligned-safe read.
        u16::from_le_bytes(unsafe { std::ptr::read_volatile(p.cast::<[u8; 2]>()) })
    }
    /// Reads a u32.
    ///
    /// # Safety
    /// `p..p+4` must be inside a live mapping.
    #[inline]
    pub unsafe fn r32(p: *const u8) -> u32 {
        // SAFETY: caller guarantees the range is mapped.
        u32::from_le_bytes(unsafe { std::ptr::read_volatile(p.cast::<[u8; 4]>()) })
    }
    /// Reads a u64.
    ///
    /// # Safety
    /// `p..p+8` must be inside a live mapping.
    #[inline]
    pub unsafe fn r64(p: *const u8) -> u64 {
        // SAFETY: caller guarantees the range is mapped.
        u64::from_le_bytes(unsafe { std::ptr::read_volatile(p.cast::<[u8; 8]>()) })
    }
    /// Writes a u16.
    ///
    /// # Safety
    /// `p..p+2` must be inside a live mapping.
    #[inline]
    pub unsafe fn w16(p: *mut u8, v: u16) {
        // SAFETY: caller guarantees the range is mapped.
        unsafe { std::ptr::write_volatile(p.cast::<[u8; 2]>(), v.to_le_bytes()) }
    }
    /// Writes a u32.
    ///
    /// # Safety
    /// `p..p+4` must be inside a live mapping.
    #[inline]
    pub unsafe fn w32(p: *mut u8, v: u32) {
        // SAFETY: caller guarantees the range is mapped.
        unsafe { std::ptr::write_volatile(p.cast::<[u8; 4]>(), v.to_le_bytes()) }
    }
    /// Writes a u64.
    ///
    /// # Safety
    /// `p..p+8` must be inside a live mapping.
    #[inline]
    pub unsafe fn w64(p: *mut u8, v: u64) {
        // SAFETY: caller guarantees the range is mapped.
        unsafe { std::ptr::write_volatile(p.cast::<[u8; 8]>(), v.to_le_bytes()) }
    }
}
