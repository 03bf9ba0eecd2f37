//! Blocking access to a bdev from a control-plane thread (tests, tools, RPC): IO is submitted and
//! completed on a reactor through that reactor's own channel; the caller waits for the reply.
//!
//! Also a data-integrity exerciser ([`verify_patterns`]) used by the tests of every backend.

use super::bdev::{Bdev, IoBuf, IoChannel, IoRequest, IoStatus};
use super::reactor::{PollStatus, Poller, Reactor, ReactorHandle};
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// One operation.
#[derive(Clone, Debug)]
pub enum Op {
    /// Read `len` bytes.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Write bytes.
    Write {
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
    },
    /// Flush.
    Flush,
    /// Discard.
    Unmap {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Zero.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

/// The outcome of an [`Op`]: its status and, for reads, the data.
pub type Reply = (IoStatus, Option<Vec<u8>>);

type Job = (Op, Sender<Reply>);

/// A bdev opened on one reactor, used from another thread.
pub struct BdevClient {
    tx: Option<Sender<Job>>,
    bdev: Arc<Bdev>,
}

struct ClientPoller {
    rx: Receiver<Job>,
    ch: IoChannel,
    closed: bool,
    stopping: bool,
}

fn to_request(op: Op, reply: Sender<Reply>) -> IoRequest {
    let cb = move |req: IoRequest, st: IoStatus| {
        let data = match (&op_kind_is_read(&req), req.buf.as_ref()) {
            (true, Some(b)) if st.is_ok() => Some(b.as_slice().to_vec()),
            _ => None,
        };
        let _ = reply.send((st, data));
    };
    match op {
        Op::Read { offset, len } => IoRequest::read(offset, IoBuf::new(len as usize), cb),
        Op::Write { offset, data } => IoRequest::write(offset, IoBuf::from_slice(&data), cb),
        Op::Flush => IoRequest::flush(cb),
        Op::Unmap { offset, len } => IoRequest::unmap(offset, len, cb),
        Op::WriteZeroes { offset, len } => IoRequest::write_zeroes(offset, len, cb),
    }
}

fn op_kind_is_read(r: &IoRequest) -> bool {
    r.kind == super::bdev::IoKind::Read
}

impl Poller for ClientPoller {
    fn poll(&mut self, _r: &mut Reactor) -> PollStatus {
        let mut n = 0;
        while n < 64 {
            match self.rx.try_recv() {
                Ok((op, reply)) => {
                    if self.stopping {
                        let _ = reply.send((IoStatus::Aborted, None));
                    } else {
                        self.ch.submit(to_request(op, reply));
                    }
                    n += 1;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
        n += self.ch.poll();
        PollStatus::from_count(n)
    }
    fn stop(&mut self, _r: &mut Reactor) {
        self.stopping = true;
    }
    fn inflight(&self) -> usize {
        self.ch.inflight()
    }
    fn done(&self) -> bool {
        self.closed && self.ch.inflight() == 0
    }
}

/// Why a client could not be opened or an IO could not be waited for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The reactor is gone.
    #[error("reactor: {0}")]
    Reactor(#[from] super::reactor::SendError),
    /// The bdev refused to open a channel.
    #[error("open channel: {0}")]
    Open(#[from] super::bdev::BdevError),
    /// The reactor stopped or the reply did not come in time.
    #[error("no reply")]
    NoReply,
}

impl BdevClient {
    /// Opens a channel to `bdev` on the reactor behind `reactor`.
    pub fn open(reactor: &ReactorHandle, bdev: &Arc<Bdev>) -> Result<BdevClient, ClientError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let b = bdev.clone();
        reactor.call(move |r| -> Result<(), super::bdev::BdevError> {
            let ch = b.open_channel(r)?;
            r.register(Box::new(ClientPoller {
                rx,
                ch,
                closed: false,
                stopping: false,
            }));
            Ok(())
        })??;
        Ok(BdevClient {
            tx: Some(tx),
            bdev: bdev.clone(),
        })
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Starts an operation; the receiver gets its reply.
    pub fn submit(&self, op: Op) -> Receiver<Reply> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if let Some(s) = &self.tx {
            let _ = s.send((op, tx));
        }
        rx
    }

    /// Runs one operation and waits (up to `timeout`) for its reply.
    pub fn run(&self, op: Op, timeout: Duration) -> Result<Reply, ClientError> {
        self.submit(op)
            .recv_timeout(timeout)
            .map_err(|_| ClientError::NoReply)
    }

    /// Reads, waiting up to 30 s.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoStatus> {
        match self.run(Op::Read { offset, len }, Duration::from_secs(30)) {
            Ok((IoStatus::Success, Some(d))) => Ok(d),
            Ok((st, _)) => Err(st),
            Err(_) => Err(IoStatus::Aborted),
        }
    }

    /// Writes, waiting up to 30 s.
    pub fn write(&self, offset: u64, data: &[u8]) -> IoStatus {
        self.run(
            Op::Write {
                offset,
                data: data.to_vec(),
            },
            Duration::from_secs(30),
        )
        .map(|r| r.0)
        .unwrap_or(IoStatus::Aborted)
    }

    /// Any other operation, waiting up to 30 s.
    pub fn status(&self, op: Op) -> IoStatus {
        self.run(op, Duration::from_secs(30))
            .map(|r| r.0)
            .unwrap_or(IoStatus::Aborted)
    }
}

/// A tiny deterministic PRNG (xorshift64*), for patterns and offsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }
    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n (n > 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }
    /// Fills bytes.
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Result of [`verify_patterns`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Writes issued.
    pub writes: u64,
    /// Unmaps / write-zeroes issued.
    pub zeroes: u64,
    /// Bytes compared on read-back.
    pub bytes_checked: u64,
}

/// Data-integrity check: `rounds` batches of up to `batch` non-overlapping writes (and some
/// write-zeroes/unmaps when `zeroing`) at random block-aligned offsets and sizes up to
/// `max_blocks` blocks, all of a batch in flight together; then the whole bdev (up to the first
/// `span` bytes) is read back in chunks and compared with a model. `model` is the expected
/// content before the run (all zeros for a fresh bdev) and holds the expected content after.
pub fn verify_patterns(
    c: &BdevClient,
    model: &mut [u8],
    seed: u64,
    rounds: u32,
    batch: usize,
    max_blocks: u64,
    zeroing: bool,
) -> Result<VerifyReport, String> {
    let bs = u64::from(c.bdev().info().block_size);
    let span = model.len() as u64;
    let blocks = span / bs;
    let mut rng = Rng::new(seed);
    let mut rep = VerifyReport::default();
    for round in 0..rounds {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut pending = Vec::new();
        for _ in 0..batch {
            let n = 1 + rng.below(max_blocks.min(blocks));
            let start = rng.below(blocks - n + 1);
            let (off, len) = (start * bs, n * bs);
            if ranges.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            ranges.push((off, len));
            let kind = rng.below(10);
            let (o, l) = (off as usize, len as usize);
            if zeroing && kind == 0 {
                model[o..o + l].fill(0);
                pending.push(((off, len), c.submit(Op::WriteZeroes { offset: off, len })));
                rep.zeroes += 1;
            } else if zeroing && kind == 1 {
                model[o..o + l].fill(0);
                pending.push(((off, len), c.submit(Op::Unmap { offset: off, len })));
                rep.zeroes += 1;
            } else {
                let mut data = vec![0u8; l];
                rng.fill(&mut data);
                model[o..o + l].copy_from_slice(&data);
                pending.push(((off, len), c.submit(Op::Write { offset: off, data })));
                rep.writes += 1;
            }
        }
        for ((off, len), rx) in pending {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((IoStatus::Success, _)) => {}
                Ok((st, _)) => {
                    return Err(format!(
                        "round {round}: write-type IO at {off}+{len} failed: {st:?}"
                    ))
                }
                Err(_) => return Err(format!("round {round}: no reply for IO at {off}+{len}")),
            }
        }
    }
    if c.status(Op::Flush) != IoStatus::Success {
        return Err("flush failed".into());
    }
    rep.bytes_checked = compare(c, model)?;
    Ok(rep)
}

/// Reads the first `model.len()` bytes back (in 1 MiB chunks, 8 in flight) and compares.
pub fn compare(c: &BdevClient, model: &[u8]) -> Result<u64, String> {
    let chunk = (1u64 << 20).min(model.len() as u64);
    let mut off = 0u64;
    let total = model.len() as u64;
    while off < total {
        let mut pending = Vec::new();
        for _ in 0..8 {
            if off >= total {
                break;
            }
            let len = chunk.min(total - off);
            pending.push((off, len, c.submit(Op::Read { offset: off, len })));
            off += len;
        }
        for (o, l, rx) in pending {
            let data = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((IoStatus::Success, Some(d))) => d,
                Ok((st, _)) => return Err(format!("read at {o}+{l} failed: {st:?}")),
                Err(_) => return Err(format!("no reply for read at {o}+{l}")),
            };
            let want = &model[o as usize..(o + l) as usize];
            if data != want {
                let i = data.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "mismatch at byte {} (read {:#04x}, expected {:#04x})",
                    o + i as u64,
                    data[i],
                    want[i]
                ));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::reactor::{ReactorOptions, ReactorSet};
    use crate::storage::registry::BackendRegistry;

    #[test]
    fn malloc_and_null_through_reactors() {
        let set = ReactorSet::spawn_threads(2, ReactorOptions::polite()).unwrap();
        let reg = BackendRegistry::with_builtin();
        let m = reg
            .create(
                "malloc",
                "m0",
                &serde_json::json!({"size_mib": 4, "block_size": 4096}),
                false,
            )
            .unwrap();
        let c0 = BdevClient::open(&set.handle(0).unwrap(), &m).unwrap();
        let c1 = BdevClient::open(&set.handle(1).unwrap(), &m).unwrap();
        let mut model = vec![0u8; 4 << 20];
        verify_patterns(&c0, &mut model, 1, 20, 16, 64, true).unwrap();
        // The other reactor sees the same bytes.
        assert_eq!(compare(&c1, &model).unwrap(), 4 << 20);
        let s = m.iostat();
        assert!(
            s.num_write_ops > 0 && s.num_read_ops >= 8 && s.bytes_read >= 8 << 20,
            "{s:?}"
        );
        assert!(s.read_latency_ticks > 0 && s.max_read_latency_ticks >= s.min_read_latency_ticks);
        // Errors: out of range, unaligned.
        assert_eq!(c0.read(4 << 20, 4096), Err(IoStatus::OutOfRange));
        assert_eq!(c0.read(512, 4096), Err(IoStatus::Unaligned));
        let e = m.iostat().io_error;
        assert_eq!((e.out_of_range, e.unaligned), (1, 1));

        let n = reg
            .create("null", "n0", &serde_json::json!({"size_mib": 1}), true)
            .unwrap();
        let c = BdevClient::open(&set.handle(1).unwrap(), &n).unwrap();
        assert_eq!(c.write(0, &[1u8; 512]), IoStatus::ReadOnly);
        assert_eq!(c.read(0, 1024).unwrap(), vec![0u8; 1024]);
        assert_eq!(n.iostat().io_error.read_only, 1);
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(7);
        let mut hist = [0u32; 10];
        for _ in 0..100_000 {
            hist[r.below(10) as usize] += 1;
        }
        assert!(
            hist.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hist:?}"
        );
    }
}
