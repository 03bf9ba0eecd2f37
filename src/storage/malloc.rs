//! `malloc`: a bdev in memory. Channels copy straight to and from one shared allocation.

use super::bdev::{
    BackendChannel, BdevBackend, BdevError, BdevInfo, Completions, IoKind, IoRequest, IoStatus,
};
use super::registry::{parse_params, BackendType, Params};
use serde::Deserialize;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

/// `malloc` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocParams {
    /// Size in MiB (give this or `num_blocks`).
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// Size in blocks (SPDK's `bdev_malloc_create` form).
    #[serde(default)]
    pub num_blocks: Option<u64>,
    /// Block size in bytes (default 512).
    #[serde(default = "default_bs")]
    pub block_size: u32,
}

impl MallocParams {
    /// Size in bytes (after [`check_geometry`]).
    pub fn bytes(&self) -> u64 {
        size_bytes(self.size_mib, self.num_blocks, self.block_size)
    }
}

/// The size given as MiB or as blocks, in bytes (0 when neither or both are given).
pub(crate) fn size_bytes(size_mib: Option<u64>, num_blocks: Option<u64>, block_size: u32) -> u64 {
    match (size_mib, num_blocks) {
        (Some(m), None) => m.saturating_mul(1 << 20),
        (None, Some(n)) => n.saturating_mul(u64::from(block_size)),
        _ => 0,
    }
}

pub(crate) fn default_bs() -> u32 {
    512
}

/// Registry entry.
pub const BACKEND: BackendType = BackendType {
    check: |p| parse(p).map(|_| ()),
    create: |p| Ok(Box::new(MallocBackend::new(&parse(p)?)?)),
};

fn parse(p: &Params) -> Result<MallocParams, BdevError> {
    let m: MallocParams = parse_params("malloc", p)?;
    check_geometry("malloc", m.size_mib, m.num_blocks, m.block_size)?;
    Ok(m)
}

/// Checks a size (MiB or blocks, exactly one of them) and a block size.
pub(crate) fn check_geometry(
    t: &str,
    size_mib: Option<u64>,
    num_blocks: Option<u64>,
    block_size: u32,
) -> Result<(), BdevError> {
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(BdevError::Params(format!(
            "{t}: block_size {block_size} must be a power of two from 512 to 65536"
        )));
    }
    match (size_mib, num_blocks) {
        (Some(m), None) if m == 0 || m > (1 << 30) => Err(BdevError::Params(format!(
            "{t}: size_mib {m} must be from 1 to 2^30"
        ))),
        (None, Some(n)) if n == 0 || n.saturating_mul(u64::from(block_size)) > (1 << 50) => {
            Err(BdevError::Params(format!(
                "{t}: num_blocks {n} must be from 1 to 2^50 bytes' worth"
            )))
        }
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err(BdevError::Params(format!(
            "{t}: give either size_mib or num_blocks"
        ))),
    }?;
    Ok(())
}

struct Memory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain bytes, shared by the reactors' channels. Channels on different reactors may copy
// to overlapping ranges at the same time only if the guest issues overlapping IO concurrently,
// whose result is unspecified on any disk; every byte pattern is a valid u8, and the allocation
// outlives every channel (each holds an Arc).
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Ok(l) = Layout::from_size_align(self.len, 4096) {
            // SAFETY: allocated in MallocBackend::new with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), l) };
        }
    }
}

/// The in-memory storage system.
pub struct MallocBackend {
    mem: Arc<Memory>,
    block_size: u32,
}

impl MallocBackend {
    /// Allocates (zeroed) memory for the bdev.
    pub fn new(p: &MallocParams) -> Result<MallocBackend, BdevError> {
        let len = usize::try_from(p.bytes())
            .map_err(|_| BdevError::Params("malloc: too large".into()))?;
        let layout = Layout::from_size_align(len, 4096)
            .map_err(|e| BdevError::Params(format!("malloc: {e}")))?;
        // SAFETY: non-zero size (checked by check_geometry).
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            BdevError::Backend(format!("malloc: cannot allocate {} bytes", p.bytes()))
        })?;
        Ok(MallocBackend {
            mem: Arc::new(Memory { ptr, len }),
            block_size: p.block_size,
        })
    }
}

impl BdevBackend for MallocBackend {
    fn type_name(&self) -> &'static str {
        "malloc"
    }
    fn info(&self) -> BdevInfo {
        BdevInfo {
            block_size: self.block_size,
            num_blocks: self.mem.len as u64 / u64::from(self.block_size),
            read_only: false,
            max_io_bytes: 0,
        }
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            mem: self.mem.clone(),
        }))
    }
}

struct MallocChannel {
    mem: Arc<Memory>,
}

impl BackendChannel for MallocChannel {
    #[inline]
    fn submit(&mut self, mut req: IoRequest, done: &mut Completions) {
        // Validated: offset + len <= mem.len, and the buffer is exactly len for reads/writes.
        let off = req.offset as usize;
        let len = req.len as usize;
        debug_assert!(off + len <= self.mem.len);
        let base = self.mem.ptr.as_ptr();
        match (req.kind, req.buf.as_mut()) {
            (IoKind::Read, Some(b)) => {
                // SAFETY: [off, off+len) is inside the allocation (validated); b has len bytes.
                unsafe { std::ptr::copy_nonoverlapping(base.add(off), b.as_mut_ptr(), len) }
            }
            (IoKind::Write, Some(b)) => {
                // SAFETY: as above; distinct allocations cannot overlap.
                unsafe { std::ptr::copy_nonoverlapping(b.as_slice().as_ptr(), base.add(off), len) }
            }
            (IoKind::Unmap | IoKind::WriteZeroes, _) => {
                // SAFETY: range validated inside the allocation.
                unsafe { std::ptr::write_bytes(base.add(off), 0, len) }
            }
            (IoKind::Flush, _) => {}
            (IoKind::Read | IoKind::Write, None) => {
                done.push(req, IoStatus::Invalid);
                return;
            }
        }
        done.push(req, IoStatus::Success);
    }
    fn poll(&mut self, _done: &mut Completions) -> usize {
        0
    }
    fn inflight(&self) -> usize {
        0
    }
    fn abort(&mut self, _done: &mut Completions) {}
}
