//! A vhost-user-blk controller: a Unix socket (mode 0600) that QEMU connects to, one connection
//! at a time, served entirely from [`VhostBlkController::poll`] — accept, message handling and
//! virtqueue polling are all non-blocking, so a reactor drives it as a poller.
//!
//! A second connection while one is live is refused (closed at once). After a disconnect the
//! next connection starts from scratch; with the inflight region QEMU hands back, requests that
//! were in flight are resubmitted. Requests of a closed connection that are still at the target
//! hold back ring processing of the next one until they finish, so an old write can never land
//! after a newer one to the same block.

use super::backend::{Backend, Outcome};
use super::blk::{BlkGeometry, BlockTarget, CompletionQueue, ID_LEN};
use super::msg::{self, MsgError, MsgReader};
use log::{info, warn};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Messages handled per poll at most (keeps ring polling going during setup bursts).
const MSG_BURST: usize = 32;
/// Requests fetched per queue per poll at most.
const RING_BURST: usize = 64;
/// While idle, the socket (accept and messages) is looked at once per this many polls: a
/// `recvmsg` that finds nothing costs more than polling every ring, and setup messages are rare.
const SOCKET_EVERY: u32 = 32;
/// How long GET_VRING_BASE waits for in-flight requests before replying anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What to create.
#[derive(Debug, Clone)]
pub struct VhostBlkControllerConfig {
    /// Controller name (also the default serial).
    pub name: String,
    /// Socket path.
    pub socket_path: PathBuf,
    /// Refuse writes even if the target accepts them.
    pub readonly: bool,
    /// Queues offered.
    pub num_queues: u16,
}

/// Counters of one controller.
#[derive(Debug, Default, Clone, Copy)]
pub struct ControllerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused because one was live.
    pub refused: u64,
    /// Requests completed (published to the guest).
    pub completed: u64,
    /// Times a device was marked broken (NEEDS_RESET).
    pub resets: u64,
    /// Requests resubmitted from the inflight region after a reconnect.
    pub resubmitted: u64,
}

struct Connection {
    stream: UnixStream,
    reader: MsgReader,
    backend: Backend,
    draining: Option<(usize, u32, Instant)>,
}

/// One vhost-user-blk controller (a VM disk).
pub struct VhostBlkController {
    cfg: VhostBlkControllerConfig,
    geo: BlkGeometry,
    listener: UnixListener,
    target: Box<dyn BlockTarget>,
    conn: Option<Connection>,
    sink: CompletionQueue,
    conn_gen: u64,
    /// Requests of closed connections still at the target.
    stale: usize,
    scratch: Vec<(
        super::blk::IoToken,
        super::blk::BlkStatus,
        std::sync::Arc<super::memory::GuestMemory>,
    )>,
    stats: ControllerStats,
    /// Polls until the socket is looked at again.
    socket_countdown: u32,
}

impl VhostBlkController {
    /// Binds the socket (replacing a stale one) and starts listening.
    pub fn new(
        cfg: VhostBlkControllerConfig,
        target: Box<dyn BlockTarget>,
    ) -> io::Result<VhostBlkController> {
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(io::Error::other("num_queues must be 1..=64"));
        }
        let bs = target.block_size();
        if bs < 512 || !bs.is_power_of_two() {
            return Err(io::Error::other("block size must be a power of two ≥ 512"));
        }
        let mut serial = [0u8; ID_LEN];
        let n = cfg.name.len().min(ID_LEN);
        serial[..n].copy_from_slice(&cfg.name.as_bytes()[..n]);
        let geo = BlkGeometry {
            block_size: bs,
            num_blocks: target.num_blocks(),
            readonly: cfg.readonly || target.readonly(),
            num_queues: cfg.num_queues,
            serial,
            discard: target.supports(super::blk::BlkOp::Discard),
            write_zeroes: target.supports(super::blk::BlkOp::WriteZeroes),
            flush: target.supports(super::blk::BlkOp::Flush),
        };
        match std::fs::remove_file(&cfg.socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&cfg.socket_path)?;
        std::fs::set_permissions(&cfg.socket_path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(VhostBlkController {
            cfg,
            geo,
            listener,
            target,
            conn: None,
            sink: CompletionQueue::default(),
            conn_gen: 0,
            stale: 0,
            scratch: Vec::new(),
            stats: ControllerStats::default(),
            socket_countdown: 0,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Its socket.
    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket_path
    }

    /// The device shape offered to the guest.
    pub fn geometry(&self) -> &BlkGeometry {
        &self.geo
    }

    /// Counters.
    pub fn stats(&self) -> ControllerStats {
        let mut s = self.stats;
        s.resubmitted += self.conn.as_ref().map_or(0, |c| c.backend.resubmitted);
        s
    }

    /// Whether a front-end is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Why the device stopped (NEEDS_RESET), if it did.
    pub fn broken(&self) -> Option<&str> {
        self.conn.as_ref()?.backend.state.broken.as_deref()
    }

    /// The live connection's back-end (its state is what a handover passes on).
    pub fn backend(&self) -> Option<&Backend> {
        self.conn.as_ref().map(|c| &c.backend)
    }

    /// Requests at the target (all connections).
    pub fn inflight(&self) -> usize {
        self.stale + self.conn.as_ref().map_or(0, |c| c.backend.outstanding())
    }

    /// One round: target completions, accept, messages, rings. Returns the work done (0 = idle).
    pub fn poll(&mut self) -> usize {
        let mut work = self.target.poll();
        work += self.drain_completions();
        if self.socket_countdown == 0 {
            let sock = self.accept() + self.service_socket();
            let busy = sock > 0
                || self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.reader.partial() || c.draining.is_some());
            self.socket_countdown = if busy { 0 } else { SOCKET_EVERY };
            work += sock;
        } else {
            self.socket_countdown -= 1;
        }
        if let Some(c) = self.conn.as_mut() {
            if self.stale == 0 && c.backend.stale == 0 && c.draining.is_none() {
                let was_broken = c.backend.state.broken.is_some();
                work += c
                    .backend
                    .process_rings(self.target.as_mut(), &self.sink, RING_BURST);
                if !was_broken && c.backend.state.broken.is_some() {
                    self.stats.resets += 1;
                }
            }
        }
        work
    }

    fn drain_completions(&mut self) -> usize {
        if self.sink.borrow().is_empty() {
            return 0;
        }
        let mut items = std::mem::take(&mut self.scratch);
        items.extend(self.sink.borrow_mut().drain(..));
        let n = items.len();
        // Completions of closed connections only release their hold.
        let gen = self.conn_gen;
        let before = items.len();
        items.retain(|(t, _, _)| t.conn == gen && gen != 0);
        let old = before - items.len();
        self.stale = self.stale.saturating_sub(old);
        match self.conn.as_mut().filter(|c| c.backend.conn_gen == gen) {
            Some(c) => self.stats.completed += c.backend.complete(&mut items) as u64,
            None => {
                self.stale = self.stale.saturating_sub(items.len());
                items.clear();
            }
        }
        self.scratch = items;
        n
    }

    fn accept(&mut self) -> usize {
        let mut work = 0;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    work += 1;
                    if self.conn.is_some() {
                        self.stats.refused += 1;
                        warn!("{}: second connection refused", self.cfg.name);
                        drop(s);
                        continue;
                    }
                    if let Err(e) = s.set_nonblocking(true) {
                        warn!("{}: connection: {e}", self.cfg.name);
                        continue;
                    }
                    self.conn_gen += 1;
                    self.stats.connections += 1;
                    info!("{}: front-end connected", self.cfg.name);
                    self.conn = Some(Connection {
                        stream: s,
                        reader: MsgReader::new(),
                        backend: Backend::new(&self.cfg.name, self.geo.clone(), self.conn_gen),
                        draining: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("{}: accept: {e}", self.cfg.name);
                    break;
                }
            }
        }
        work
    }

    fn disconnect(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            info!("{}: front-end disconnected: {why}", self.cfg.name);
            self.stats.resubmitted += c.backend.resubmitted;
            // Its requests still at the target hold back the next connection's rings.
            self.stale += c.backend.outstanding();
        }
    }

    fn service_socket(&mut self) -> usize {
        let Some(c) = self.conn.as_mut() else {
            return 0;
        };
        let fd = c.stream.as_raw_fd();
        let mut work = 0;
        if let Some((ring, request, since)) = c.draining {
            let v = &c.backend.state.vrings[ring];
            if v.state.outstanding > 0 && since.elapsed() < DRAIN_TIMEOUT {
                return 0;
            }
            if v.state.outstanding > 0 {
                warn!(
                    "{}: ring {ring}: {} requests still in flight after {:?}; replying anyway",
                    self.cfg.name, v.state.outstanding, DRAIN_TIMEOUT
                );
            }
            let body = c.backend.stop_ring(ring);
            c.draining = None;
            if let Err(e) = msg::send_reply(fd, request, &body, &[]) {
                self.disconnect(&format!("reply: {e}"));
                return 1;
            }
            work += 1;
        }
        for _ in 0..MSG_BURST {
            let Some(c) = self.conn.as_mut() else { break };
            let m = match c.reader.poll(fd) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(MsgError::Closed) => {
                    self.disconnect("closed by peer");
                    break;
                }
                Err(e) => {
                    self.disconnect(&e.to_string());
                    break;
                }
            };
            work += 1;
            let hdr = m.hdr;
            let out = c.backend.handle(m);
            let sent = match out {
                Outcome::Reply(body) => msg::send_reply(fd, hdr.request, &body, &[]),
                Outcome::ReplyFd(body, rfd) => msg::send_reply(fd, hdr.request, &body, &[rfd]),
                Outcome::Ack(ok) => {
                    if hdr.need_reply() && c.backend.reply_ack() {
                        let v: u64 = if ok { 0 } else { 1 };
                        msg::send_reply(fd, hdr.request, &v.to_ne_bytes(), &[])
                    } else {
                        if !ok {
                            warn!(
                                "{}: request {} failed (no ack asked)",
                                self.cfg.name, hdr.request
                            );
                        }
                        Ok(())
                    }
                }
                Outcome::DrainThenReply(ring) => {
                    c.draining = Some((ring, hdr.request, Instant::now()));
                    break;
                }
            };
            if let Err(e) = sent {
                self.disconnect(&format!("reply: {e}"));
                break;
            }
        }
        work
    }
}

impl Drop for VhostBlkController {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cfg.socket_path);
    }
}
