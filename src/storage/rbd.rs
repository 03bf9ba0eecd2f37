//! `rbd`: a Ceph RBD image through librbd, the way SPDK's `bdev_rbd` and QEMU's rbd driver reach
//! it — from user space, asynchronously (`rbd_aio_*`).
//!
//! One librados cluster handle serves every bdev of the same cluster (same user, config file,
//! keyring and config options; refcounted, see [`ceph::Cluster::get`]); each bdev opens its image
//! once and every reactor's channel submits on that image (librbd is thread-safe).
//!
//! Completions arrive on librbd's threads. The callback only moves the request's buffer and
//! return code into a message on the submitting channel's queue; the channel's `poll`, on its
//! reactor, matches it to the held [`IoRequest`] (which never leaves the reactor) and completes it.
//!
//! Connection loss (an OSD or monitor away): librados keeps the operations and resends them when
//! the cluster is back, so requests are held, not failed. The hold is bounded by `io_timeout_ms`
//! (default 30 s): an op librados gives up on (`ETIMEDOUT` after `rados_osd_op_timeout`) is resent
//! while the request is younger than that; a request older than that fails with `ETIMEDOUT` — the
//! caller gets a copy of its buffer back, the original stays with librbd until librbd is done.
//!
//! Image changed underneath: a header watch (resize) and a once-a-second check of the header
//! object (removal) run on a helper thread. A shrunken or removed image makes that bdev — only
//! that one — fail its IO with `ENODEV`, with one error log saying why; a grown image keeps
//! serving its original size.

use super::bdev::{
    BackendChannel, BdevBackend, BdevError, BdevInfo, Completions, IoBuf, IoKind, IoRequest,
    IoStatus,
};
use super::ceph::{self, AioCtx, AioDone, AioOp, Cluster, ClusterKey, Image, Timeouts};
use super::malloc::default_bs;
use super::registry::{parse_params, BackendType, Params};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest read/write in one request.
pub const MAX_IO: u64 = 64 << 20;

/// `rbd` parameters: SPDK's `bdev_rbd_create` (`pool_name`, `rbd_name`, `user_id`, `config`,
/// `block_size`) plus `bdev_rbd_register_cluster`'s `config_file`/`key_file`, and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdParams {
    /// Pool.
    #[serde(alias = "pool")]
    pub pool_name: String,
    /// Image.
    #[serde(alias = "image")]
    pub rbd_name: String,
    /// Ceph user id (`client.<id>`, default `admin`).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Ceph config options (SPDK's key/value `config`), applied after `config_file`.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    /// A ceph.conf (default: librados' search, unless `config`/`mon_host` are given).
    #[serde(default)]
    pub config_file: Option<String>,
    /// A keyring file.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Shorthand for `config.mon_host`.
    #[serde(default)]
    pub mon_host: Option<String>,
    /// Block size (default 512).
    #[serde(default = "default_bs")]
    pub block_size: u32,
    /// Bound on connecting at create: `client_mount_timeout`, `rados_mon_op_timeout`
    /// (whole seconds, default 5000 ms).
    #[serde(default = "default_connect")]
    pub connect_timeout_ms: u64,
    /// `rados_osd_op_timeout` (whole seconds, default 10000 ms): also bounds opening the image.
    #[serde(default = "default_osd_op")]
    pub osd_op_timeout_ms: u64,
    /// How long a request is held while the cluster is unreachable before it fails with
    /// `ETIMEDOUT` (default 30000 ms).
    #[serde(default = "default_io_timeout")]
    pub io_timeout_ms: u64,
    /// Requests in flight per channel (default 256; more wait in the channel).
    #[serde(default = "default_inflight")]
    pub max_inflight: u32,
}

fn default_connect() -> u64 {
    5_000
}
fn default_osd_op() -> u64 {
    10_000
}
fn default_io_timeout() -> u64 {
    30_000
}
fn default_inflight() -> u32 {
    256
}

impl RbdParams {
    /// The cluster this bdev connects to (bdevs with equal keys share a connection).
    pub fn cluster_key(&self) -> Result<ClusterKey, BdevError> {
        let mut config = BTreeMap::new();
        for (k, v) in &self.config {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(BdevError::Params(format!(
                        "rbd params: config.{k}: expected a string, number or boolean"
                    )))
                }
            };
            config.insert(k.clone(), s);
        }
        if let Some(m) = &self.mon_host {
            config.insert("mon_host".into(), m.clone());
        }
        Ok(ClusterKey {
            user_id: self.user_id.clone(),
            config_file: self.config_file.clone(),
            key_file: self.key_file.clone(),
            config,
        })
    }
}

fn parse(p: &Params) -> Result<(RbdParams, ClusterKey), BdevError> {
    let r: RbdParams = parse_params("rbd", p)?;
    if r.pool_name.is_empty() || r.rbd_name.is_empty() {
        return Err(BdevError::Params(
            "rbd params: pool_name and rbd_name must be non-empty".into(),
        ));
    }
    if !r.block_size.is_power_of_two() || !(512..=65536).contains(&r.block_size) {
        return Err(BdevError::Params(format!(
            "rbd: block_size {} must be a power of two from 512 to 65536",
            r.block_size
        )));
    }
    if !(1..=65536).contains(&r.max_inflight) {
        return Err(BdevError::Params(
            "rbd: max_inflight must be from 1 to 65536".into(),
        ));
    }
    let key = r.cluster_key()?;
    Ok((r, key))
}

/// Registry entry.
pub const BACKEND: BackendType = BackendType {
    check: |p| parse(p).map(|_| ()),
    create: |p| {
        let (r, k) = parse(p)?;
        Ok(Box::new(RbdBackend::open(&r, &k)?))
    },
};

fn ceph_err(e: ceph::CephError) -> BdevError {
    BdevError::Backend(format!("rbd: {e}"))
}

/// State shared by a bdev's channels and its monitor thread.
struct Shared {
    image: Arc<Image>,
    /// Bytes served (the size at open).
    size: u64,
    /// Set once when the image is shrunk or removed underneath: why IO now fails.
    broken: OnceLock<String>,
    io_timeout: Duration,
    max_inflight: u32,
}

impl Shared {
    fn mark_broken(&self, why: String) {
        if self.broken.set(why.clone()).is_ok() {
            log::error!(
                "rbd {}: {why}: failing this bdev's IO with ENODEV (delete and recreate it)",
                self.image.spec()
            );
        }
    }
}

/// The RBD storage system: one open image.
pub struct RbdBackend {
    shared: Arc<Shared>,
    block_size: u32,
    watch: Option<ceph::Watch>,
    monitor: Option<(Sender<()>, JoinHandle<()>)>,
}

impl RbdBackend {
    /// Connects (or reuses the cluster connection), opens the image, starts watching it.
    /// Blocking; bounded by the connect and OSD op timeouts.
    pub fn open(p: &RbdParams, key: &ClusterKey) -> Result<RbdBackend, BdevError> {
        let t = Timeouts {
            connect: Duration::from_millis(p.connect_timeout_ms),
            osd_op: Duration::from_millis(p.osd_op_timeout_ms),
        };
        let cluster = Cluster::get(key, t).map_err(ceph_err)?;
        let io = Arc::new(cluster.ioctx(&p.pool_name).map_err(ceph_err)?);
        let image = Arc::new(Image::open(io, &p.rbd_name).map_err(ceph_err)?);
        let size = image.size().map_err(ceph_err)?;
        if size < u64::from(p.block_size) {
            return Err(BdevError::Backend(format!(
                "rbd {}: image is smaller than one block",
                image.spec()
            )));
        }
        let shared = Arc::new(Shared {
            image: image.clone(),
            size,
            broken: OnceLock::new(),
            io_timeout: Duration::from_millis(p.io_timeout_ms),
            max_inflight: p.max_inflight,
        });
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let wtx = tx.clone();
        // The watch callback runs on a librbd thread: it only nudges the monitor thread.
        let watch = match image.watch(Box::new(move || {
            let _ = wtx.try_send(());
        })) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("rbd {}: {e}: resizes are not noticed", image.spec());
                None
            }
        };
        let sh = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("rbd-monitor".into())
            .spawn(move || monitor(sh, rx))
            .map_err(|err| BdevError::Io {
                what: "rbd: starting the monitor thread".into(),
                err,
            })?;
        Ok(RbdBackend {
            shared,
            block_size: p.block_size,
            watch,
            monitor: Some((tx, monitor)),
        })
    }

    /// Why the bdev fails its IO, if it does (image shrunk or removed).
    pub fn broken(&self) -> Option<&str> {
        self.shared.broken.get().map(String::as_str)
    }
}

/// Checks the image when its header changes (resize) and once a second (removal). Blocking
/// librbd calls are fine here: this is not a reactor.
fn monitor(sh: Arc<Shared>, rx: Receiver<()>) {
    let mut grew_logged = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => match sh.image.size() {
                Ok(s) if s < sh.size => sh.mark_broken(format!(
                    "image shrank underneath from {} to {s} bytes",
                    sh.size
                )),
                Ok(s) if s > sh.size && !grew_logged => {
                    log::info!(
                        "rbd {}: image grew from {} to {s} bytes; serving the first {} until the bdev is recreated",
                        sh.image.spec(),
                        sh.size,
                        sh.size
                    );
                    grew_logged = true;
                }
                Ok(_) => {}
                Err(e) if e.errno == libc::ENOENT => {
                    sh.mark_broken("image was removed underneath".into())
                }
                Err(e) => log::debug!("rbd {}: {e}", sh.image.spec()),
            },
            Err(RecvTimeoutError::Timeout) => {
                if sh.broken.get().is_none() && matches!(sh.image.header_exists(), Ok(false)) {
                    sh.mark_broken("image was removed underneath".into());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        // Stop the callbacks first, then the thread; the image closes when the last Arc goes.
        self.watch = None;
        if let Some((tx, h)) = self.monitor.take() {
            drop(tx);
            let _ = h.join();
        }
    }
}

impl BdevBackend for RbdBackend {
    fn type_name(&self) -> &'static str {
        "rbd"
    }
    fn info(&self) -> BdevInfo {
        BdevInfo {
            block_size: self.block_size,
            num_blocks: self.shared.size / u64::from(self.block_size),
            read_only: false,
            max_io_bytes: MAX_IO,
        }
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let n = self.shared.max_inflight as usize;
        let (tx, rx) = crossbeam_channel::unbounded();
        let hz = super::ticks_hz();
        Ok(Box::new(RbdChannel {
            sh: self.shared.clone(),
            tx,
            rx,
            slots: (0..n).map(|_| Slot::default()).collect(),
            free: (0..n as u32).rev().collect(),
            waiting: VecDeque::new(),
            held: 0,
            hold_ticks: (self.shared.io_timeout.as_nanos() * u128::from(hz) / 1_000_000_000) as u64,
            scan_ticks: hz / 100,
            next_scan: 0,
        }))
    }
}

/// One in-flight position of a channel.
struct Slot {
    /// Bumped at every submission: a completion for an older one is ignored.
    gen: u32,
    /// The caller's request while librbd works on it (`None` once completed or given up on).
    req: Option<IoRequest>,
    /// librbd holds an `AioCtx` for this slot (the slot is reusable only once it is back).
    inflight: bool,
    /// For writes, the data librbd is reading (to copy it back to a request given up on).
    wdata: *const u8,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            gen: 0,
            req: None,
            inflight: false,
            wdata: std::ptr::null(),
        }
    }
}

struct RbdChannel {
    sh: Arc<Shared>,
    tx: Sender<AioDone>,
    rx: Receiver<AioDone>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Requests waiting for a free slot, oldest first.
    waiting: VecDeque<IoRequest>,
    /// Slots holding a caller's request.
    held: usize,
    hold_ticks: u64,
    scan_ticks: u64,
    next_scan: u64,
}

fn aio_op(k: IoKind) -> AioOp {
    match k {
        IoKind::Read => AioOp::Read,
        IoKind::Write => AioOp::Write,
        IoKind::Flush => AioOp::Flush,
        IoKind::Unmap => AioOp::Discard,
        IoKind::WriteZeroes => AioOp::WriteZeroes,
    }
}

fn status_of(rc: i64) -> IoStatus {
    match rc {
        r if r >= 0 => IoStatus::Success,
        r if -r == i64::from(libc::EOPNOTSUPP) => IoStatus::Unsupported,
        r => IoStatus::IoError(i32::try_from(-r).unwrap_or(libc::EIO)),
    }
}

impl RbdChannel {
    /// Hands `req` to librbd in slot `i` (taken from `free`).
    fn start(&mut self, i: u32, mut req: IoRequest, done: &mut Completions) {
        let slot = &mut self.slots[i as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.wdata = match (req.kind, req.buf.as_ref()) {
            (IoKind::Write, Some(b)) => b.as_slice().as_ptr(),
            _ => std::ptr::null(),
        };
        let ctx = Box::new(AioCtx {
            slot: i,
            gen: slot.gen,
            buf: req.buf.take(),
            tx: self.tx.clone(),
        });
        match self
            .sh
            .image
            .aio(aio_op(req.kind), req.offset, req.len, ctx)
        {
            Ok(()) => {
                slot.req = Some(req);
                slot.inflight = true;
                self.held += 1;
            }
            Err((ctx, errno)) => {
                req.buf = ctx.buf;
                slot.wdata = std::ptr::null();
                self.free.push(i);
                done.push(req, IoStatus::IoError(errno));
            }
        }
    }

    fn deadline(&self, req: &IoRequest) -> u64 {
        req.submit_tick().saturating_add(self.hold_ticks)
    }

    /// Completes the request held in slot `i` now, while librbd still owns its buffer: the
    /// caller gets a copy (writes) or a fresh buffer (reads). The slot stays busy until librbd's
    /// completion arrives.
    fn give_up(&mut self, i: usize, st: IoStatus, done: &mut Completions) {
        let slot = &mut self.slots[i];
        let Some(mut req) = slot.req.take() else {
            return;
        };
        self.held -= 1;
        let len = req.len as usize;
        req.buf = match req.kind {
            IoKind::Read => Some(IoBuf::new(len)),
            IoKind::Write if !slot.wdata.is_null() => {
                // SAFETY: wdata points to the `len` bytes of the write's buffer, which is owned by
                // the in-flight AioCtx or by its completion message waiting in `self.rx`; neither
                // is freed while this channel (the receiver) lives, and librbd only reads them.
                let data = unsafe { std::slice::from_raw_parts(slot.wdata, len) };
                Some(IoBuf::from_slice(data))
            }
            _ => None,
        };
        done.push(req, st);
    }

    fn fill_slots(&mut self, done: &mut Completions) -> usize {
        let mut n = 0;
        while !self.waiting.is_empty() {
            let Some(i) = self.free.pop() else { break };
            let Some(req) = self.waiting.pop_front() else {
                self.free.push(i);
                break;
            };
            self.start(i, req, done);
            n += 1;
        }
        n
    }

    fn fail_waiting(&mut self, st: IoStatus, done: &mut Completions) {
        while let Some(r) = self.waiting.pop_front() {
            done.push(r, st);
        }
    }
}

impl BackendChannel for RbdChannel {
    fn submit(&mut self, req: IoRequest, done: &mut Completions) {
        if self.sh.broken.get().is_some() {
            done.push(req, IoStatus::IoError(libc::ENODEV));
            return;
        }
        match self.free.pop() {
            Some(i) if self.waiting.is_empty() => self.start(i, req, done),
            Some(i) => {
                self.free.push(i);
                self.waiting.push_back(req);
            }
            None => self.waiting.push_back(req),
        }
    }

    fn poll(&mut self, done: &mut Completions) -> usize {
        let mut work = 0;
        let mut now = 0;
        while let Ok(d) = self.rx.try_recv() {
            work += 1;
            let i = d.slot as usize;
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            if d.gen != slot.gen || !slot.inflight {
                continue; // cannot happen: one completion per submission
            }
            slot.inflight = false;
            slot.wdata = std::ptr::null();
            let Some(mut req) = slot.req.take() else {
                // Given up on earlier: the buffer (in `d`) is freed here; the slot is free again.
                self.free.push(d.slot);
                continue;
            };
            self.held -= 1;
            req.buf = d.buf;
            if d.rc == -i64::from(libc::ETIMEDOUT) && self.sh.broken.get().is_none() {
                if now == 0 {
                    now = super::ticks();
                }
                if now < self.deadline(&req) {
                    // librados gave up on an OSD op; the request's hold time is not over: resend.
                    self.start(d.slot, req, done);
                    continue;
                }
            }
            self.free.push(d.slot);
            done.push(req, status_of(d.rc));
        }
        if self.sh.broken.get().is_some() && !self.waiting.is_empty() {
            self.fail_waiting(IoStatus::IoError(libc::ENODEV), done);
        }
        work += self.fill_slots(done);
        // Requests held too long (the cluster stays away): fail them, oldest checks first.
        let t = if now == 0 { super::ticks() } else { now };
        if t >= self.next_scan {
            self.next_scan = t + self.scan_ticks;
            let mut expired = 0;
            for i in 0..self.slots.len() {
                if let Some(r) = &self.slots[i].req {
                    if t >= self.deadline(r) {
                        self.give_up(i, IoStatus::IoError(libc::ETIMEDOUT), done);
                        expired += 1;
                    }
                }
            }
            while self.waiting.front().is_some_and(|r| t >= self.deadline(r)) {
                if let Some(r) = self.waiting.pop_front() {
                    done.push(r, IoStatus::IoError(libc::ETIMEDOUT));
                    expired += 1;
                }
            }
            if expired > 0 {
                log::error!(
                    "rbd {}: {expired} requests not completed within {:?} (cluster unreachable?): failed with ETIMEDOUT",
                    self.sh.image.spec(),
                    self.sh.io_timeout
                );
                work += expired;
            }
        }
        work
    }

    fn inflight(&self) -> usize {
        self.held + self.waiting.len()
    }

    fn abort(&mut self, done: &mut Completions) {
        for i in 0..self.slots.len() {
            self.give_up(i, IoStatus::Aborted, done);
        }
        self.fail_waiting(IoStatus::Aborted, done);
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        // Requests still held get their callbacks (Aborted); librbd keeps the buffers it has and
        // frees them on its thread when the completion finds this queue closed.
        let mut sink = Completions::default();
        self.abort(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params() {
        let (p, k) = parse(&json!({"pool_name": "rbd", "rbd_name": "a", "user_id": "hp",
            "config": {"mon_host": "127.0.0.1:6789", "rados_osd_op_timeout": 3}, "block_size": 4096}))
        .unwrap();
        assert_eq!((p.block_size, p.io_timeout_ms), (4096, 30_000));
        assert_eq!(k.user_id.as_deref(), Some("hp"));
        assert_eq!(k.config["rados_osd_op_timeout"], "3");
        let (_, k2) =
            parse(&json!({"pool": "rbd", "image": "b", "mon_host": "127.0.0.1:6789"})).unwrap();
        assert_eq!(k2.config["mon_host"], "127.0.0.1:6789");
        assert!(parse(&json!({"pool_name": "rbd"})).is_err());
        assert!(parse(&json!({"pool_name": "rbd", "rbd_name": "a", "block_size": 1000})).is_err());
        assert!(
            parse(&json!({"pool_name": "rbd", "rbd_name": "a", "bogus": 1}))
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
        assert!(
            parse(&json!({"pool_name": "rbd", "rbd_name": "a", "config": {"x": [1]}})).is_err()
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of(4096), IoStatus::Success);
        assert_eq!(status_of(0), IoStatus::Success);
        assert_eq!(
            status_of(-i64::from(libc::EOPNOTSUPP)),
            IoStatus::Unsupported
        );
        assert_eq!(status_of(-5), IoStatus::IoError(5));
    }
}
