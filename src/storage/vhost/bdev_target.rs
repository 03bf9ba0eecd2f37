//! [`BdevTarget`]: virtio-blk requests served by a bdev, through the IO channel of the reactor
//! that owns the controller.
//!
//! The bdev layer takes one contiguous, owned [`IoBuf`] per request while a guest request is a
//! list of scattered guest buffers, so data is copied: a write gathers the guest buffers into the
//! `IoBuf` before submitting, a read scatters the `IoBuf` into the guest buffers in the
//! completion callback. Buffers come back to a small per-target pool, so steady-state IO does not
//! allocate data buffers. (Zero copy needs vectored requests in the bdev layer; see
//! docs/vhost-blk.md.)
//!
//! Completions arrive from [`IoChannel::poll`], which the controller's `poll` calls through
//! [`BlockTarget::poll`]: on the same reactor, as `BlkIo` requires.

use super::blk::{BlkIo, BlkOp, BlkStatus, BlockTarget};
use crate::storage::bdev::{BdevInfo, IoBuf, IoChannel, IoRequest, IoStatus};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Buffers larger than this are not kept in the pool.
const POOL_MAX_BUF: usize = 128 << 10;
/// Buffers kept at most (all sizes together): 256 × 128 KiB = 32 MiB per controller at worst.
const POOL_MAX_BUFS: usize = 256;

/// Free data buffers by exact length (an `IoRequest`'s buffer must be exactly its length).
#[derive(Default)]
struct BufPool {
    free: HashMap<usize, Vec<IoBuf>>,
    held: usize,
}

impl BufPool {
    fn get(&mut self, len: usize) -> IoBuf {
        match self.free.get_mut(&len).and_then(Vec::pop) {
            Some(b) => {
                self.held -= 1;
                b
            }
            None => IoBuf::new(len),
        }
    }

    fn put(&mut self, b: IoBuf) {
        if b.len() <= POOL_MAX_BUF && self.held < POOL_MAX_BUFS {
            self.held += 1;
            self.free.entry(b.len()).or_default().push(b);
        }
    }
}

/// The virtio-blk status for a bdev completion: unsupported kinds are `UNSUPP`, every other
/// failure (out of range, read-only, backend errno, aborted at shutdown) is `IOERR`.
pub fn blk_status(st: IoStatus) -> BlkStatus {
    match st {
        IoStatus::Success => BlkStatus::Ok,
        IoStatus::Unsupported => BlkStatus::Unsupp,
        IoStatus::OutOfRange
        | IoStatus::Unaligned
        | IoStatus::ReadOnly
        | IoStatus::Invalid
        | IoStatus::IoError(_)
        | IoStatus::Aborted => BlkStatus::IoErr,
    }
}

/// A [`BlockTarget`] over one reactor's IO channel on a bdev. Lives on that reactor (`!Send`,
/// like the channel).
pub struct BdevTarget {
    channel: IoChannel,
    info: BdevInfo,
    pool: Rc<RefCell<BufPool>>,
}

impl BdevTarget {
    /// Serves requests through `channel` (opened on the calling reactor).
    pub fn new(channel: IoChannel) -> BdevTarget {
        let info = channel.bdev().info().clone();
        BdevTarget {
            channel,
            info,
            pool: Rc::default(),
        }
    }

    /// The bdev's name.
    pub fn bdev_name(&self) -> &str {
        self.channel.bdev().name()
    }
}

impl BlockTarget for BdevTarget {
    fn block_size(&self) -> u32 {
        self.info.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.info.num_blocks
    }

    fn readonly(&self) -> bool {
        self.info.read_only
    }

    // Every storage system serves flush, unmap and write-zeroes (a system without them reports
    // success or emulates them, see docs/storage.md), so all are offered.

    fn submit(&mut self, mut io: BlkIo) {
        let (offset, len) = (io.offset, io.len);
        let pool = self.pool.clone();
        let req = match io.op {
            BlkOp::Read => {
                let buf = pool.borrow_mut().get(len as usize);
                IoRequest::read(offset, buf, move |mut req, st| {
                    if let Some(b) = req.buf.take() {
                        if st.is_ok() {
                            io.copy_to_guest(b.as_slice());
                        }
                        pool.borrow_mut().put(b);
                    }
                    io.complete(blk_status(st));
                })
            }
            BlkOp::Write => {
                let mut buf = pool.borrow_mut().get(len as usize);
                io.copy_from_guest(buf.as_mut_slice());
                IoRequest::write(offset, buf, move |mut req, st| {
                    if let Some(b) = req.buf.take() {
                        pool.borrow_mut().put(b);
                    }
                    io.complete(blk_status(st));
                })
            }
            BlkOp::Flush => IoRequest::flush(move |_, st| io.complete(blk_status(st))),
            BlkOp::Discard => {
                IoRequest::unmap(offset, len, move |_, st| io.complete(blk_status(st)))
            }
            BlkOp::WriteZeroes => {
                IoRequest::write_zeroes(offset, len, move |_, st| io.complete(blk_status(st)))
            }
        };
        self.channel.submit(req);
    }

    fn poll(&mut self) -> usize {
        self.channel.poll()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(blk_status(IoStatus::Success), BlkStatus::Ok);
        assert_eq!(blk_status(IoStatus::Unsupported), BlkStatus::Unsupp);
        for st in [
            IoStatus::OutOfRange,
            IoStatus::Unaligned,
            IoStatus::ReadOnly,
            IoStatus::Invalid,
            IoStatus::IoError(5),
            IoStatus::Aborted,
        ] {
            assert_eq!(blk_status(st), BlkStatus::IoErr, "{st:?}");
        }
    }

    #[test]
    fn pool_reuses_by_length_and_is_bounded() {
        let mut p = BufPool::default();
        let mut b = p.get(4096);
        let ptr = b.as_mut_ptr();
        p.put(b);
        assert_eq!(p.get(8192).len(), 8192);
        let mut again = p.get(4096);
        assert_eq!(again.as_mut_ptr(), ptr, "same buffer back");
        p.put(IoBuf::new(POOL_MAX_BUF + 512));
        assert_eq!(p.held, 0, "large buffers are not kept");
        for _ in 0..POOL_MAX_BUFS + 10 {
            p.put(IoBuf::new(512));
        }
        assert_eq!(p.held, POOL_MAX_BUFS);
    }
}
