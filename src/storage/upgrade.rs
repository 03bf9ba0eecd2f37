//! Backend upgrade: pause → drain → swap the storage system → replay → resume, on a live bdev.
//!
//! Every bdev the [`BackendRegistry`](super::registry::BackendRegistry) creates is a
//! [`ServiceBackend`]: the storage system's backend behind per-reactor
//! [`ServiceQueue`](super::service_queue::ServiceQueue)s. The operations here run on a control
//! thread (an RPC handler) and block; they reach the reactors only through the service's atomic
//! control word and read back what the channels publish.
//!
//! - [`ServiceBackend::pause`]: stop forwarding; wait until every channel has seen it and nothing
//!   is pending, or the timeout passes (then report what is still pending). Requests keep
//!   arriving and wait.
//! - [`ServiceBackend::resume`]: forward again.
//! - [`ServiceBackend::upgrade`]: pause and drain, create the backend again with new parameters
//!   (a new NBD server address, a file at a new path, ...), check it has the same geometry, make
//!   it current and resume in one step; each channel replays what the old backend did not
//!   complete. Refused when the drain times out unless `force` (the operator states that the old
//!   service is gone and can execute nothing any more — see docs/upgrade.md).
//!
//! The process hot upgrade (handing vhost-user connections to a new process) builds on the same
//! pause/drain; see docs/upgrade.md.

use super::bdev::{BackendChannel, Bdev, BdevBackend, BdevError, BdevInfo};
use super::registry::{BackendType, Params};
use super::service_queue::{QueueSnapshot, ServiceQueue, ServiceShared};
use serde::Serialize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an upgrade waits for every channel to pick up the new backend before reporting.
const SWAP_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an upgrade waits for the channels' early connections to the new backend before
/// pausing anyway (the switch then waits for them inside the pause).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(2);

/// Control-plane bookkeeping of one service.
#[derive(Debug, Default)]
struct ControlState {
    params: Params,
    paused_since: Option<Instant>,
    paused_total: Duration,
    last_pause: Duration,
    pauses: u64,
    upgrades: u64,
    last_upgrade: Option<UpgradeReport>,
}

/// A storage system behind wait/pending queues, upgradable while in use.
pub struct ServiceBackend {
    type_name: &'static str,
    btype: BackendType,
    info: BdevInfo,
    shared: Arc<ServiceShared>,
    // One control operation at a time (pause/resume/upgrade); held across their waits.
    op: Mutex<()>,
    // Held briefly; never by a reactor.
    ctl: Mutex<ControlState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`ServiceBackend::pause`] found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PauseReport {
    /// Nothing pending and every channel stopped forwarding.
    pub drained: bool,
    /// How long the drain took (or the timeout).
    pub waited_ms: f64,
    /// Requests forwarded and not completed.
    pub pending: u64,
    /// Of those, write-type.
    pub pending_writes: u64,
    /// Requests waiting (held).
    pub waiting: u64,
    /// Age of the oldest pending request.
    pub oldest_pending_ms: f64,
    /// Open channels, and how many have stopped forwarding.
    pub channels: usize,
    /// Channels that acknowledged the pause.
    pub acked: usize,
}

/// What [`ServiceBackend::upgrade`] did.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UpgradeReport {
    /// New backend generation.
    pub generation: u64,
    /// Pause and drain (see [`PauseReport`]).
    pub pause: PauseReport,
    /// Time to create the new backend (connect, open), before the pause.
    pub create_ms: f64,
    /// Time for every channel's early connection to the new backend, before the pause.
    pub prepare_ms: f64,
    /// Channels ready on the new backend when the pause began.
    pub prepared: usize,
    /// From the pause to every channel running on the new backend: the stall callers saw.
    pub stall_ms: f64,
    /// Requests replayed on the new backend by this upgrade.
    pub replayed: u64,
    /// Channels that could not open the new backend (they hold their IO).
    pub errors: Vec<String>,
}

/// Why an upgrade did not happen (the service is back in the state it was in before).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// New parameters are invalid.
    #[error("{0}")]
    Params(String),
    /// Pending requests did not drain and `force` was not given.
    #[error("{} requests still pending after {:.0} ms ({} writes); the old service may still execute them: stop it and retry with force", .0.pending, .0.waited_ms, .0.pending_writes)]
    NotDrained(PauseReport),
    /// The new backend could not be created.
    #[error("new backend: {0}")]
    Create(BdevError),
    /// The new backend's geometry differs.
    #[error("new backend geometry {new:?} differs from the bdev's {old:?}")]
    Geometry {
        /// The bdev's.
        old: BdevInfo,
        /// The new backend's.
        new: BdevInfo,
    },
}

/// Counters and state of one service (`bdev_get_service_stats`).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStats {
    /// Storage system.
    pub system: &'static str,
    /// Backend generation (upgrades done).
    pub generation: u64,
    /// Paused now.
    pub paused: bool,
    /// Time spent paused, in total (the current pause included).
    pub paused_ms_total: f64,
    /// Length of the last finished pause (or of the current one so far).
    pub paused_ms_last: f64,
    /// Pauses begun.
    pub pauses: u64,
    /// Upgrades done.
    pub upgrades: u64,
    /// Current backend parameters.
    pub params: Params,
    /// Queues now and totals.
    pub queues: QueueSnapshot,
    /// Age of the oldest pending request.
    pub oldest_pending_ms: f64,
    /// The last upgrade.
    pub last_upgrade: Option<UpgradeReport>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ticks_ms(t: u64) -> f64 {
    t as f64 * 1e3 / super::ticks_hz().max(1) as f64
}

/// `base` with the keys of `overlay` replaced (objects merge one level deep).
pub fn merge_params(base: &Params, overlay: &Params) -> Params {
    match (base, overlay) {
        (Params::Object(b), Params::Object(o)) => {
            let mut m = b.clone();
            for (k, v) in o {
                m.insert(k.clone(), v.clone());
            }
            Params::Object(m)
        }
        (_, Params::Null) => base.clone(),
        (_, o) => o.clone(),
    }
}

impl ServiceBackend {
    /// Puts `backend`, created by `btype` from `params`, behind service queues.
    pub fn new(
        btype: BackendType,
        params: Params,
        backend: Box<dyn BdevBackend>,
    ) -> ServiceBackend {
        let type_name = backend.type_name();
        let info = backend.info();
        ServiceBackend {
            type_name,
            btype,
            info,
            shared: ServiceShared::new(Arc::from(backend)),
            op: Mutex::new(()),
            ctl: Mutex::new(ControlState {
                params,
                ..Default::default()
            }),
        }
    }

    /// The service behind a bdev, if it has one.
    pub fn of(bdev: &Bdev) -> Option<&ServiceBackend> {
        bdev.backend().as_any()?.downcast_ref()
    }

    /// The channels' shared control (tests drive it directly).
    pub fn shared(&self) -> &Arc<ServiceShared> {
        &self.shared
    }

    /// Current backend parameters.
    pub fn params(&self) -> Params {
        lock(&self.ctl).params.clone()
    }

    fn begin_pause(&self) {
        let mut c = lock(&self.ctl);
        self.shared.set_paused(true);
        if c.paused_since.is_none() {
            c.paused_since = Some(Instant::now());
            c.pauses += 1;
        }
    }

    fn end_pause(c: &mut ControlState) -> Duration {
        match c.paused_since.take() {
            Some(t) => {
                let d = t.elapsed();
                c.paused_total += d;
                c.last_pause = d;
                d
            }
            None => Duration::ZERO,
        }
    }

    fn report(s: &QueueSnapshot, drained: bool, waited: Duration) -> PauseReport {
        PauseReport {
            drained,
            waited_ms: ms(waited),
            pending: s.pending,
            pending_writes: s.pending_writes,
            waiting: s.waiting,
            oldest_pending_ms: ticks_ms(s.oldest_pending_ticks),
            channels: s.channels,
            acked: s.acked,
        }
    }

    /// Waits until every channel acknowledged the control word and nothing is pending.
    fn drain(&self, timeout: Duration) -> PauseReport {
        let t0 = Instant::now();
        loop {
            let s = self.shared.snapshot();
            let drained = s.acked == s.channels && s.pending == 0;
            if drained || t0.elapsed() >= timeout {
                return Self::report(&s, drained, t0.elapsed());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Stops forwarding and waits up to `drain_timeout` for pending requests to complete. The
    /// service stays paused either way (until [`ServiceBackend::resume`]).
    pub fn pause(&self, drain_timeout: Duration) -> PauseReport {
        let _op = lock(&self.op);
        self.begin_pause();
        self.drain(drain_timeout)
    }

    /// Forwards again. Returns how long the service was paused (0 if it was not).
    pub fn resume(&self) -> Duration {
        let _op = lock(&self.op);
        let mut c = lock(&self.ctl);
        self.shared.set_paused(false);
        Self::end_pause(&mut c)
    }

    /// Create the backend from the current parameters with `overlay` applied, then pause, drain,
    /// swap, replay, resume. On error the service is left as it was (paused only if it was
    /// paused before).
    pub fn upgrade(
        &self,
        overlay: &Params,
        drain_timeout: Duration,
        force: bool,
    ) -> Result<UpgradeReport, UpgradeError> {
        let _op = lock(&self.op);
        let merged = merge_params(&lock(&self.ctl).params, overlay);
        (self.btype.check)(&merged).map_err(|e| UpgradeError::Params(e.to_string()))?;
        // Create (connect to the new server, open the new file) before pausing: IO keeps going
        // on the old backend meanwhile, and a backend that cannot be made costs no pause at all.
        let tc = Instant::now();
        let backend = (self.btype.create)(&merged).map_err(UpgradeError::Create)?;
        let create = tc.elapsed();
        let new = backend.info();
        if new.block_size != self.info.block_size
            || new.num_blocks != self.info.num_blocks
            || (new.read_only && !self.info.read_only)
        {
            return Err(UpgradeError::Geometry {
                old: self.info.clone(),
                new,
            });
        }
        // Every channel opens its channel to the new backend while IO still flows to the old one.
        let tp = Instant::now();
        let backend: Arc<dyn BdevBackend> = Arc::from(backend);
        self.shared.prepare(backend.clone());
        let prepared = loop {
            let s = self.shared.snapshot();
            if s.prepared == s.channels || tp.elapsed() >= PREPARE_TIMEOUT {
                break s.prepared;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let prepare = tp.elapsed();
        let was_paused = self.shared.control().paused();
        let t0 = Instant::now();
        self.begin_pause();
        let pause = self.drain(drain_timeout);
        if !pause.drained && !force {
            self.shared.cancel_prepare();
            if !was_paused {
                let mut c = lock(&self.ctl);
                self.shared.set_paused(false);
                Self::end_pause(&mut c);
            }
            return Err(UpgradeError::NotDrained(pause));
        }
        let before = self.shared.snapshot().replayed;
        // New backend and resume in one store: each channel swaps, replays and forwards at once.
        let ctl = self.shared.install(backend, false);
        let deadline = Instant::now() + SWAP_ACK_TIMEOUT;
        let snap = loop {
            let s = self.shared.snapshot();
            if s.acked == s.channels || Instant::now() >= deadline {
                break s;
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        let stall = t0.elapsed();
        let mut c = lock(&self.ctl);
        Self::end_pause(&mut c);
        c.params = merged;
        c.upgrades += 1;
        let rep = UpgradeReport {
            generation: ctl.generation(),
            pause,
            create_ms: ms(create),
            prepare_ms: ms(prepare),
            prepared,
            stall_ms: ms(stall),
            replayed: snap.replayed.saturating_sub(before),
            errors: snap.errors,
        };
        c.last_upgrade = Some(rep.clone());
        log::info!(
            "{} service upgraded to generation {}: stall {:.2} ms (create {:.2} ms), {} replayed",
            self.type_name,
            rep.generation,
            rep.stall_ms,
            rep.create_ms,
            rep.replayed
        );
        Ok(rep)
    }

    /// Counters and state.
    pub fn stats(&self) -> ServiceStats {
        let c = lock(&self.ctl);
        let cur = c.paused_since.map(|t| t.elapsed()).unwrap_or_default();
        let queues = self.shared.snapshot();
        ServiceStats {
            system: self.type_name,
            generation: self.shared.control().generation(),
            paused: self.shared.control().paused(),
            paused_ms_total: ms(c.paused_total + cur),
            paused_ms_last: ms(if c.paused_since.is_some() {
                cur
            } else {
                c.last_pause
            }),
            pauses: c.pauses,
            upgrades: c.upgrades,
            params: c.params.clone(),
            oldest_pending_ms: ticks_ms(queues.oldest_pending_ticks),
            queues,
            last_upgrade: c.last_upgrade.clone(),
        }
    }
}

impl BdevBackend for ServiceBackend {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn info(&self) -> BdevInfo {
        self.info.clone()
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(ServiceQueue::open(self.shared.clone())?))
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
