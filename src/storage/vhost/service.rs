//! vhost-user-blk controllers on the storage reactors, and their control plane.
//!
//! A controller lives on one reactor: its [`BdevTarget`] holds that reactor's IO channel on the
//! bdev, and a [`VhostPoller`] drives [`VhostBlkController::poll`] there (busy when it moved
//! anything). All queues of a controller are served by that reactor.
//!
//! [`VhostControl`] is the control side (RPC threads): the table of controllers, which reactor
//! each runs on, and `save_config`'s calls. Creating, inspecting or deleting a controller sends a
//! message to its reactor and waits for the answer; the RPC threads never touch a controller.
//! Control operations are serialised by the table's mutex; reactors never take it.

use super::bdev_target::BdevTarget;
use super::controller::{ControllerStats, VhostBlkController, VhostBlkControllerConfig};
use super::snapshot::ControllerSnapshot;
use crate::handover::fdpass::FdIn;
use crate::storage::bdev::Bdev;
use crate::storage::reactor::{PollStatus, Poller, Reactor, ReactorHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Default socket directory (SPDK's `-S` default).
pub const DEFAULT_VHOST_DIR: &str = "/var/tmp";
/// Queues offered when `num_queues` is not given. QEMU's `num-queues` (one per vCPU by default)
/// must not exceed it; QEMU tells the guest its own count, so offering more costs nothing.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// The only transport.
pub const TRANSPORT: &str = "vhost_user_blk";
/// How long a control operation waits for a reactor.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Finds a bdev by name: the bdev and the reactor that owns it.
pub type BdevLookup = Arc<dyn Fn(&str) -> Option<(Arc<Bdev>, u32)> + Send + Sync>;

/// Errors of the control operations; the message starts with the param it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VhostError {
    /// A bad or conflicting parameter (JSON-RPC -32602).
    #[error("{0}")]
    Param(String),
    /// The operation is refused in the current state (a connected front-end).
    #[error("{0}")]
    Busy(String),
    /// A reactor did not answer, or failed.
    #[error("{0}")]
    Internal(String),
}

fn param(name: &str, msg: impl std::fmt::Display) -> VhostError {
    VhostError::Param(format!("{name}: {msg}"))
}

/// `vhost_create_blk_controller`'s params (SPDK's names; unknown ones are ignored).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct CreateBlkController {
    /// Controller name: the socket is `<vhost dir>/<ctrlr>`, the serial its first 20 bytes.
    pub ctrlr: String,
    /// The bdev it serves.
    pub dev_name: String,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// SPDK cpumask (`"0x2"`, `"[1,3-4]"`): the reactor is picked among the storage reactors on
    /// those lcores. Default: the reactor that owns the bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
    /// Packed virtqueues: not supported (refused when true).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packed_ring: bool,
    /// Only `vhost_user_blk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Queues offered (hostplane extension; default [`DEFAULT_NUM_QUEUES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

/// Parses an SPDK cpumask: a hex mask (`0x2`, `2`) or a list (`[0,2-3]`). Returns the lcores.
pub fn parse_cpumask(s: &str) -> Result<BTreeSet<u32>, String> {
    let s = s.trim();
    let mut set = BTreeSet::new();
    if let Some(list) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let num = |x: &str| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("{x:?} is not a core number"))
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if a > b || b >= 1024 {
                return Err(format!("bad core range {part:?}"));
            }
            set.extend(a..=b);
        }
    } else {
        let hex = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if hex.is_empty() || hex.len() > 256 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is neither a hex mask (0x2) nor a core list ([1,3-4])"
            ));
        }
        for (i, c) in hex.bytes().rev().enumerate() {
            let v = (c as char).to_digit(16).unwrap_or(0);
            for bit in 0..4 {
                if v & (1 << bit) != 0 {
                    set.insert(i as u32 * 4 + bit);
                }
            }
        }
    }
    if set.is_empty() {
        return Err(format!("{s:?} selects no core"));
    }
    Ok(set)
}

/// The hex mask of one core.
pub fn core_mask(core: u32) -> String {
    let mut digits = vec![b'0'; core as usize / 4 + 1];
    let last = digits.len() - 1;
    digits[last - core as usize / 4] = b"1248"[core as usize % 4];
    format!("0x{}", String::from_utf8_lossy(&digits))
}

// ---- on the reactor ----

/// A controller slot shared by its poller and the reactor's table (`None` once deleted).
type Slot = Rc<RefCell<Option<VhostBlkController>>>;

thread_local! {
    /// The controllers of the reactor running on this thread, by name. Weak: the poller owns the
    /// controller, so a reactor that stops drops it (and its socket and IO channel) as usual.
    static ON_REACTOR: RefCell<HashMap<String, Weak<RefCell<Option<VhostBlkController>>>>> =
        RefCell::new(HashMap::new());
}

fn local(name: &str) -> Option<Slot> {
    ON_REACTOR.with(|m| m.borrow().get(name).and_then(Weak::upgrade))
}

/// Drives one controller from a reactor.
pub struct VhostPoller {
    slot: Slot,
}

impl Poller for VhostPoller {
    fn poll(&mut self, _r: &mut Reactor) -> PollStatus {
        match self.slot.borrow_mut().as_mut() {
            Some(c) => PollStatus::from_count(c.poll()),
            None => PollStatus::Idle,
        }
    }

    fn stop(&mut self, _r: &mut Reactor) {
        if let Some(c) = self.slot.borrow_mut().as_mut() {
            c.stop();
        }
    }

    fn inflight(&self) -> usize {
        self.slot.borrow().as_ref().map_or(0, |c| c.inflight())
    }

    fn done(&self) -> bool {
        self.slot.borrow().is_none()
    }
}

/// What the control plane asks a reactor to build.
struct Spec {
    cfg: VhostBlkControllerConfig,
    bdev: Arc<Bdev>,
    /// Taken over from another process (handover): restored paused, not bound.
    takeover: Option<(ControllerSnapshot, FdIn)>,
}

/// Builds a controller on the calling reactor and registers its poller.
fn start_on(r: &mut Reactor, spec: Spec) -> Result<(), String> {
    let name = spec.cfg.name.clone();
    if local(&name).is_some() {
        return Err(format!("controller {name:?} already runs on this reactor"));
    }
    let channel = spec
        .bdev
        .open_channel(r)
        .map_err(|e| format!("bdev {}: {e}", spec.bdev.name()))?;
    let socket = spec.cfg.socket_path.display().to_string();
    let target = Box::new(BdevTarget::new(channel));
    let ctrl = match spec.takeover {
        Some((snap, mut fds)) => {
            let mut c = VhostBlkController::restore(spec.cfg, target, &snap, &mut fds)
                .map_err(|e| format!("takeover: {e}"))?;
            // Nothing is fetched until the old process has released the rings.
            c.pause();
            c
        }
        None => VhostBlkController::new(spec.cfg, target)
            .map_err(|e| format!("socket {socket}: {e}"))?,
    };
    let slot: Slot = Rc::new(RefCell::new(Some(ctrl)));
    ON_REACTOR.with(|m| {
        let mut m = m.borrow_mut();
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(name, Rc::downgrade(&slot));
    });
    r.register(Box::new(VhostPoller { slot }));
    Ok(())
}

/// A controller's state as seen from its reactor.
#[derive(Debug, Clone, Default)]
pub struct ControllerStatus {
    /// A front-end is connected.
    pub connected: bool,
    /// Connection generation (1 for the first connection).
    pub connection: u64,
    /// Queues started by the front-end.
    pub queues_started: usize,
    /// Requests at the bdev.
    pub inflight: usize,
    /// Why the device stopped (NEEDS_RESET), if it did.
    pub broken: Option<String>,
    /// Counters.
    pub stats: ControllerStats,
}

fn status_on(name: &str) -> Option<ControllerStatus> {
    let slot = local(name)?;
    let g = slot.borrow();
    let c = g.as_ref()?;
    let be = c.backend();
    Some(ControllerStatus {
        connected: c.connected(),
        connection: be.map_or(0, |b| b.conn_gen),
        queues_started: be.map_or(0, |b| {
            b.state.vrings.iter().filter(|v| v.state.started).count()
        }),
        inflight: c.inflight(),
        broken: c.broken().map(String::from),
        stats: c.stats(),
    })
}

/// Drops the controller now (socket removed, IO channel closed); refused while connected.
fn delete_on(name: &str) -> Result<(), VhostError> {
    let Some(slot) = local(name) else {
        return Ok(());
    };
    let mut g = slot.borrow_mut();
    if g.as_ref().is_some_and(|c| c.connected()) {
        return Err(VhostError::Busy(format!(
            "ctrlr: {name:?} has a connected front-end (stop the VM or remove its disk first)"
        )));
    }
    // Dropped here, inside the message, so a controller created next under the same name never
    // has its socket removed by this one's Drop. Its poller reports done and is removed.
    *g = None;
    ON_REACTOR.with(|m| m.borrow_mut().remove(name));
    Ok(())
}

/// [`ReactorHandle::call`] that gives up after `timeout` (the closure may still run later).
fn call_timeout<R: Send + 'static>(
    h: &ReactorHandle,
    f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
) -> Result<R, VhostError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    h.send(move |r| {
        let _ = tx.send(f(r));
    })
    .map_err(|e| VhostError::Internal(format!("storage reactor {}: {e}", h.id())))?;
    rx.recv_timeout(CALL_TIMEOUT).map_err(|e| {
        VhostError::Internal(format!(
            "storage reactor {}: {}",
            h.id(),
            match e {
                crossbeam_channel::RecvTimeoutError::Timeout =>
                    format!("no answer within {CALL_TIMEOUT:?}"),
                crossbeam_channel::RecvTimeoutError::Disconnected => "stopped".into(),
            }
        ))
    })
}

// ---- control plane ----

/// One storage reactor as the control plane sees it.
pub struct ReactorSlot {
    /// Its handle.
    pub handle: ReactorHandle,
    /// The core number cpumasks select it by: its lcore, or its index on a thread reactor.
    pub core: u32,
}

struct Entry {
    params: CreateBlkController,
    reactor: usize,
    socket: PathBuf,
    num_queues: u16,
}

/// The controllers of one hostplane (control side).
pub struct VhostControl {
    dir: PathBuf,
    reactors: Mutex<Vec<ReactorSlot>>,
    lookup: BdevLookup,
    table: Mutex<BTreeMap<String, Entry>>,
}

impl VhostControl {
    /// Controllers with sockets in `dir`, on `reactors`, serving bdevs found by `lookup`.
    pub fn new(dir: &Path, reactors: Vec<ReactorSlot>, lookup: BdevLookup) -> VhostControl {
        VhostControl {
            dir: dir.to_path_buf(),
            reactors: Mutex::new(reactors),
            lookup,
            table: Mutex::new(BTreeMap::new()),
        }
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, i: usize) -> Result<ReactorHandle, VhostError> {
        self.reactors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .map(|r| r.handle.clone())
            .ok_or_else(|| VhostError::Internal(format!("no storage reactor {i}")))
    }

    fn cores(&self) -> Vec<u32> {
        self.reactors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|r| r.core)
            .collect()
    }

    fn check_name(&self, name: &str) -> Result<PathBuf, VhostError> {
        if name.is_empty()
            || name.starts_with('.')
            || name
                .chars()
                .any(|c| c == '/' || c.is_control() || c.is_whitespace())
        {
            return Err(param(
                "ctrlr",
                format!("{name:?}: must be non-empty, without '/', whitespace or a leading '.'"),
            ));
        }
        let path = self.dir.join(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(param(
                "ctrlr",
                format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    /// `vhost_create_blk_controller`. Creating a controller that exists with the same bdev,
    /// read-only flag and queues succeeds without change, so a saved config replays over the
    /// controllers of the config file.
    pub fn create(&self, p: CreateBlkController) -> Result<(), VhostError> {
        self.create_with(p, None)
    }

    /// [`VhostControl::create`], or with `takeover`, the controller a previous process handed
    /// over (its listening socket is live: the path is not checked nor bound). A taken-over
    /// controller starts paused (see [`VhostControl::on_controller`]).
    pub fn create_with(
        &self,
        p: CreateBlkController,
        takeover: Option<(ControllerSnapshot, FdIn)>,
    ) -> Result<(), VhostError> {
        if p.packed_ring {
            return Err(param(
                "packed_ring",
                "packed virtqueues are not supported (split rings only)",
            ));
        }
        if let Some(t) = p.transport.as_deref().filter(|t| *t != TRANSPORT) {
            return Err(param(
                "transport",
                format!("{t:?} is not supported (only {TRANSPORT:?})"),
            ));
        }
        let num_queues = p.num_queues.unwrap_or(DEFAULT_NUM_QUEUES);
        if num_queues == 0 || num_queues > 64 {
            return Err(param("num_queues", "must be 1..=64"));
        }
        let socket = self.check_name(&p.ctrlr)?;
        let cores = self.cores();
        if cores.is_empty() {
            return Err(param(
                "ctrlr",
                "no storage reactors: give hostplane storage lcores (storage.lcores or [[vm]]s)",
            ));
        }
        let mask = match p.cpumask.as_deref() {
            Some(m) => Some(parse_cpumask(m).map_err(|e| param("cpumask", e))?),
            None => None,
        };
        let mut table = self.table();
        if let Some(e) = table.get(&p.ctrlr) {
            let same = e.params.dev_name == p.dev_name
                && e.params.readonly == p.readonly
                && e.num_queues == num_queues
                && mask
                    .as_ref()
                    .is_none_or(|m| cores.get(e.reactor).is_some_and(|c| m.contains(c)));
            return if same {
                Ok(())
            } else {
                Err(param(
                    "ctrlr",
                    format!(
                        "{:?} exists (bdev {:?}); delete it first",
                        p.ctrlr, e.params.dev_name
                    ),
                ))
            };
        }
        let (bdev, owner) = (self.lookup)(&p.dev_name)
            .ok_or_else(|| param("dev_name", format!("no bdev named {:?}", p.dev_name)))?;
        if let Some(other) = table.values().find(|e| e.params.dev_name == p.dev_name) {
            // Two front-ends writing one bdev would corrupt it; SPDK refuses too (bdev claim).
            return Err(param(
                "dev_name",
                format!(
                    "bdev {:?} is already served by controller {:?}",
                    p.dev_name, other.params.ctrlr
                ),
            ));
        }
        let reactor = match &mask {
            None if (owner as usize) < cores.len() => owner as usize,
            None => 0,
            Some(m) => {
                // The least loaded reactor in the mask (SPDK's choice too).
                let load = |i: usize| table.values().filter(|e| e.reactor == i).count();
                (0..cores.len())
                    .filter(|&i| m.contains(&cores[i]))
                    .min_by_key(|&i| (load(i), i))
                    .ok_or_else(|| {
                        param(
                            "cpumask",
                            format!(
                                "{} selects no storage reactor (storage lcores: {})",
                                p.cpumask.as_deref().unwrap_or(""),
                                cores
                                    .iter()
                                    .map(|c| c.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?
            }
        };
        if takeover.is_none() {
            check_socket_path(&socket)?;
        }
        let spec = Spec {
            cfg: VhostBlkControllerConfig {
                name: p.ctrlr.clone(),
                socket_path: socket.clone(),
                readonly: p.readonly,
                num_queues,
            },
            bdev,
            takeover,
        };
        call_timeout(&self.handle(reactor)?, move |r| start_on(r, spec))?
            .map_err(|e| param("ctrlr", e))?;
        log::info!(
            "vhost-user-blk controller {} on {} (bdev {}{}, {num_queues} queues) on reactor {reactor} (lcore {})",
            p.ctrlr,
            socket.display(),
            p.dev_name,
            if p.readonly { ", read-only" } else { "" },
            cores[reactor]
        );
        let params = CreateBlkController {
            cpumask: Some(core_mask(cores[reactor])),
            transport: None,
            packed_ring: false,
            ..p
        };
        table.insert(
            params.ctrlr.clone(),
            Entry {
                params,
                reactor,
                socket,
                num_queues,
            },
        );
        Ok(())
    }

    /// `vhost_delete_controller`: refused while a front-end is connected (as SPDK does).
    pub fn delete(&self, name: &str) -> Result<(), VhostError> {
        let mut table = self.table();
        let e = table
            .get(name)
            .ok_or_else(|| param("ctrlr", format!("no controller named {name:?}")))?;
        let n = name.to_string();
        call_timeout(&self.handle(e.reactor)?, move |_| delete_on(&n))??;
        table.remove(name);
        log::info!("vhost-user-blk controller {name} deleted");
        Ok(())
    }

    /// `vhost_get_controllers` (SPDK's shape, plus hostplane's `stats`).
    pub fn list(&self, name: Option<&str>) -> Result<Value, VhostError> {
        let table = self.table();
        if let Some(n) = name.filter(|n| !table.contains_key(*n)) {
            return Err(param("name", format!("no controller named {n:?}")));
        }
        let cores = self.cores();
        let mut out = Vec::new();
        for (n, e) in table.iter().filter(|(n, _)| name.is_none_or(|x| x == *n)) {
            let key = n.clone();
            let st = call_timeout(&self.handle(e.reactor)?, move |_| status_on(&key))?
                .unwrap_or_default();
            let sessions: Vec<Value> = if st.connected {
                vec![json!({
                    "vid": st.connection.saturating_sub(1),
                    "id": 0,
                    "name": format!("{n}s0"),
                    "started": st.queues_started > 0,
                    "max_queues": st.queues_started,
                    "inflight_task_cnt": st.inflight,
                })]
            } else {
                Vec::new()
            };
            out.push(json!({
                "ctrlr": n,
                "cpumask": cores.get(e.reactor).map(|&c| core_mask(c)),
                "delay_base_us": 0,
                "iops_threshold": 60000,
                "socket": e.socket,
                "sessions": sessions,
                "backend_specific": {"block": {
                    "readonly": e.params.readonly,
                    "bdev": e.params.dev_name,
                    "transport": TRANSPORT,
                }},
                "stats": {
                    "reactor": e.reactor,
                    "num_queues": e.num_queues,
                    "connections": st.stats.connections,
                    "refused": st.stats.refused,
                    "completed": st.stats.completed,
                    "resets": st.stats.resets,
                    "resubmitted": st.stats.resubmitted,
                    "inflight": st.inflight,
                    "broken": st.broken,
                },
            }));
        }
        Ok(Value::Array(out))
    }

    /// `save_config`'s `vhost_blk` calls: one `vhost_create_blk_controller` per controller, with
    /// the cpumask of the reactor it runs on.
    pub fn save(&self) -> Vec<(String, Value)> {
        self.table()
            .values()
            .map(|e| {
                (
                    "vhost_create_blk_controller".to_string(),
                    serde_json::to_value(&e.params).unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    /// Drops the reactor handles (before the reactors and EAL go away); later operations fail.
    pub fn shutdown(&self) {
        self.reactors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Runs `f` on controller `name`, on its reactor, and returns what it returns.
    pub fn on_controller<R: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&mut VhostBlkController) -> R + Send + 'static,
    ) -> Result<R, VhostError> {
        let reactor = self
            .table()
            .get(name)
            .map(|e| e.reactor)
            .ok_or_else(|| param("ctrlr", format!("no controller named {name:?}")))?;
        let n = name.to_string();
        call_timeout(&self.handle(reactor)?, move |_| {
            let slot = local(&n)?;
            let mut g = slot.borrow_mut();
            g.as_mut().map(f)
        })?
        .ok_or_else(|| VhostError::Internal(format!("controller {name:?} is gone")))
    }

    /// A new process's first health check of controller `name` (before it owns the guests):
    /// the controller answers on its reactor, and its bdev serves a one-block read through a
    /// channel of its own on the bdev's reactor within `timeout`. The read is harmless while
    /// another process still serves the guest.
    pub fn health_check(&self, name: &str, timeout: Duration) -> Result<(), String> {
        let (bdev_name, reactor) = {
            let t = self.table();
            let e = t
                .get(name)
                .ok_or_else(|| format!("no controller named {name:?}"))?;
            (e.params.dev_name.clone(), e.reactor)
        };
        self.on_controller(name, |_| ())
            .map_err(|e| format!("controller {name}: {e}"))?;
        let (bdev, _) = (self.lookup)(&bdev_name)
            .ok_or_else(|| format!("controller {name}: bdev {bdev_name:?} is gone"))?;
        let client = crate::storage::client::BdevClient::open(
            &self.handle(reactor).map_err(|e| e.to_string())?,
            &bdev,
        )
        .map_err(|e| format!("bdev {bdev_name}: open a channel: {e}"))?;
        let len = u64::from(bdev.info().block_size);
        match client.run(crate::storage::client::Op::Read { offset: 0, len }, timeout) {
            Ok((crate::storage::bdev::IoStatus::Success, _)) => Ok(()),
            Ok((st, _)) => Err(format!(
                "bdev {bdev_name}: a {len}-byte read failed: {st:?}"
            )),
            Err(_) => Err(format!(
                "bdev {bdev_name}: a {len}-byte read did not complete within {timeout:?}"
            )),
        }
    }

    /// The create params of every controller (as `save_config` has them).
    pub fn params(&self) -> Vec<CreateBlkController> {
        self.table().values().map(|e| e.params.clone()).collect()
    }

    /// Names of the controllers.
    pub fn names(&self) -> Vec<String> {
        self.table().keys().cloned().collect()
    }
}

/// A controller's socket path may hold nothing, or a stale socket (its process died, nobody
/// accepts). A live socket (another process serves it) or a file that is not a socket is left
/// alone and refused.
fn check_socket_path(path: &Path) -> Result<(), VhostError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(param(
                "ctrlr",
                format!("{}: another process is serving this socket", path.display()),
            )),
            Err(_) => Ok(()),
        },
        Ok(_) => Err(param(
            "ctrlr",
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpumasks() {
        let s = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(parse_cpumask("0x2").unwrap(), s(&[1]));
        assert_eq!(parse_cpumask("0X6").unwrap(), s(&[1, 2]));
        assert_eq!(parse_cpumask("f0").unwrap(), s(&[4, 5, 6, 7]));
        assert_eq!(parse_cpumask("0x100").unwrap(), s(&[8]));
        assert_eq!(parse_cpumask("[0, 2-3]").unwrap(), s(&[0, 2, 3]));
        for bad in ["", "0x", "0x0", "zz", "[3-1]", "[a]", "[]", "0x2 3"] {
            assert!(parse_cpumask(bad).is_err(), "{bad:?}");
        }
        for c in [0, 1, 3, 4, 9, 63, 64, 127] {
            assert_eq!(parse_cpumask(&core_mask(c)).unwrap(), s(&[c]), "{c}");
        }
        assert_eq!(core_mask(1), "0x2");
        assert_eq!(core_mask(4), "0x10");
    }
}
