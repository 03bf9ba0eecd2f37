//! Process hot upgrade: a running hostplane hands its vhost-user connections, guest memory,
//! eventfds, inflight regions, listening sockets and live config to a new hostplane process
//! over a Unix socket, so the guests never see a disconnect. See docs/upgrade.md.
//!
//! - [`fdpass`]: JSON messages with any number of fds (SCM_RIGHTS).
//! - [`serve`]: the old process's side (a thread listening on the handover socket).
//! - [`take_over`]: the new process's side (`hostplane run --takeover SOCK`).
//!
//! Protocol (each line one message; fds in brackets):
//! ```text
//! new → old  hello {pid}
//!            old pauses every controller (no new request fetched, no message read) and
//!            waits until none has a request at its bdev (≤ QUIESCE_TIMEOUT; else: error, resume)
//! old → new  state {pid, config (save_config), rpc_socket, controllers: n} [rpc listener]
//! old → new  n × controller {params, snapshot} [listener, stream, memory, eventfds, inflight]
//!            new restores each controller paused (maps memory, restarts rings from inflight)
//!            and health-checks it (its reactor answers, its bdev serves a one-block read)
//! new → old  ready            (or abort {error}: old resumes, new exits)
//!            old releases everything (never polls, replies or unlinks again)
//! old → new  released         new resumes the controllers; old exits
//! ```
//! Until `ready` reaches it, the old process owns the guests: any failure before that (new
//! process crashes, refuses a snapshot, times out) resumes it. After `released`, the new one owns
//! them. Requests are fetched by exactly one process at any time.

pub mod fdpass;

use crate::control::{JsonConfig, Registry};
use crate::storage::vhost::service::{CreateBlkController, VhostControl};
use crate::storage::vhost::snapshot::ControllerSnapshot;
use fdpass::{FdIn, FdOut};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the old process waits for its controllers to drain before refusing a handover.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the new process's health check waits for each controller's bdev to answer a read.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Fault injection for rollback drills: `HOSTPLANE_HANDOVER_FAULT=health-check` in the new
/// process's environment makes its first health check fail (everything rolls back to the old
/// process).
pub const FAULT_ENV: &str = "HOSTPLANE_HANDOVER_FAULT";
/// Timeout of each step of the exchange.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Messages of the handover socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Msg {
    /// New → old: take over.
    Hello {
        /// The new process.
        pid: u32,
    },
    /// Old → new: the live config and the number of controllers that follow. Fd: the RPC
    /// listening socket.
    State {
        /// The old process.
        pid: u32,
        /// Its `save_config`.
        config: Value,
        /// Its RPC socket path.
        rpc_socket: PathBuf,
        /// Controller messages that follow.
        controllers: usize,
        /// Microseconds the drain took (requests already at the bdevs completing).
        drained_us: u64,
    },
    /// Old → new: one controller, with its fds.
    Controller {
        /// `vhost_create_blk_controller` params.
        params: CreateBlkController,
        /// Its state.
        snapshot: Box<ControllerSnapshot>,
    },
    /// New → old: everything restored (paused).
    Ready,
    /// New → old: restoring failed; the old process keeps serving.
    Abort {
        /// Why.
        error: String,
    },
    /// Old → new: everything released; the old process exits.
    Released,
    /// Old → new: the handover is refused (e.g. a controller did not drain).
    Error {
        /// Why.
        error: String,
    },
}

fn send(s: &UnixStream, m: &Msg, fds: &[RawFd]) -> io::Result<()> {
    let json = serde_json::to_vec(m).map_err(io::Error::other)?;
    fdpass::send(s, &json, fds)
}

fn recv(s: &UnixStream) -> io::Result<(Msg, Vec<OwnedFd>)> {
    let (json, fds) = fdpass::recv(s)?;
    let m = serde_json::from_slice(&json).map_err(io::Error::other)?;
    Ok((m, fds))
}

/// What the old process's handover thread needs.
pub struct OldSide {
    /// The controllers.
    pub vhost: Option<Arc<VhostControl>>,
    /// For `save_config`.
    pub registry: Arc<Registry>,
    /// The RPC listening socket (passed on).
    pub rpc_fd: RawFd,
    /// Its path.
    pub rpc_socket: PathBuf,
    /// Set once the new process owns everything: the main loop exits without unlinking.
    pub handed_over: Arc<AtomicBool>,
}

/// Listens on `path` (mode 0600) for a new process to take over; serves one handover at a time
/// on a background thread until one succeeds.
pub fn serve(path: &Path, old: OldSide) -> io::Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(s) = conn else { continue };
                let _ = s.set_read_timeout(Some(STEP_TIMEOUT));
                let _ = s.set_write_timeout(Some(STEP_TIMEOUT));
                match hand_over(&s, &old) {
                    Ok(()) => {
                        old.handed_over.store(true, Ordering::SeqCst);
                        // The new process listens on its own handover socket at this path.
                        return;
                    }
                    Err(e) => log::error!("handover: {e}; this process keeps serving"),
                }
            }
            let _ = std::fs::remove_file(&path);
        })
}

fn controllers(old: &OldSide) -> Vec<String> {
    old.vhost.as_ref().map(|v| v.names()).unwrap_or_default()
}

fn each(
    old: &OldSide,
    f: impl Fn(&mut crate::storage::vhost::VhostBlkController) + Clone + Send + 'static,
) {
    if let Some(v) = &old.vhost {
        for n in v.names() {
            if let Err(e) = v.on_controller(&n, f.clone()) {
                log::warn!("handover: controller {n}: {e}");
            }
        }
    }
}

fn hand_over(s: &UnixStream, old: &OldSide) -> Result<(), String> {
    let (hello, _) = recv(s).map_err(|e| format!("hello: {e}"))?;
    let Msg::Hello { pid } = hello else {
        return Err(format!("expected hello, got {hello:?}"));
    };
    log::info!("handover: process {pid} takes over; pausing controllers");
    let t0 = Instant::now();
    each(old, |c| c.pause());
    let result = hand_over_paused(s, old, pid, t0);
    match &result {
        Ok(()) => {}
        Err(e) => {
            each(old, |c| c.resume());
            let _ = send(s, &Msg::Error { error: e.clone() }, &[]);
            log::warn!("handover: resumed after {:?}", t0.elapsed());
        }
    }
    result
}

fn hand_over_paused(s: &UnixStream, old: &OldSide, pid: u32, t0: Instant) -> Result<(), String> {
    let names = controllers(old);
    let vhost = old.vhost.clone();
    // Drain: every controller's requests complete at its bdev.
    loop {
        let mut busy = Vec::new();
        if let Some(v) = &vhost {
            for n in &names {
                if !v.on_controller(n, |c| c.quiesced()).unwrap_or(false) {
                    busy.push(n.clone());
                }
            }
        }
        if busy.is_empty() {
            break;
        }
        if t0.elapsed() > QUIESCE_TIMEOUT {
            return Err(format!(
                "controllers {busy:?} still have requests in flight after {QUIESCE_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let drained = t0.elapsed();
    let config = serde_json::to_value(old.registry.save()).unwrap_or(Value::Null);
    send(
        s,
        &Msg::State {
            pid: std::process::id(),
            config,
            rpc_socket: old.rpc_socket.clone(),
            controllers: names.len(),
            drained_us: drained.as_micros() as u64,
        },
        &[old.rpc_fd],
    )
    .map_err(|e| format!("send state: {e}"))?;
    if let Some(v) = &vhost {
        let params = v.params();
        for n in &names {
            let (snap, fds) = v
                .on_controller(n, |c| {
                    let mut fds = FdOut::default();
                    c.snapshot(&mut fds).map(|s| (s, fds.0))
                })
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let p = params
                .iter()
                .find(|p| &p.ctrlr == n)
                .cloned()
                .ok_or_else(|| format!("controller {n} vanished"))?;
            // The fds stay open here: the controller is paused and nothing closes them.
            send(
                s,
                &Msg::Controller {
                    params: p,
                    snapshot: Box::new(snap),
                },
                &fds,
            )
            .map_err(|e| format!("send controller {n}: {e}"))?;
        }
    }
    let (reply, _) = recv(s).map_err(|e| format!("waiting for process {pid}: {e}"))?;
    match reply {
        Msg::Ready => {}
        Msg::Abort { error } => return Err(format!("process {pid} aborted: {error}")),
        m => return Err(format!("process {pid}: unexpected {m:?}")),
    }
    // Point of no return: the new process owns the guests from here.
    each(old, |c| c.release());
    if let Err(e) = send(s, &Msg::Released, &[]) {
        log::error!("handover: telling process {pid}: {e}");
    }
    log::info!(
        "handover to process {pid} done: {} controllers, drained in {drained:?}, paused for {:?} here",
        names.len(),
        t0.elapsed()
    );
    Ok(())
}

/// The default handover socket of a process whose RPC socket is `rpc`.
pub fn default_socket(rpc: &Path) -> PathBuf {
    let mut s = rpc.as_os_str().to_owned();
    s.push(".handover");
    PathBuf::from(s)
}

/// The config file's controllers (`vhost = "name"` on a disk), at start and after a takeover (for
/// those that were not handed over: creating one that exists with the same params is a no-op).
/// A controller that cannot be created is logged and the others carry on.
pub fn create_config_controllers(vhost: &VhostControl, vms: &[crate::storage::routing::VmSection]) {
    for vm in vms {
        for d in &vm.disks {
            let Some(ctrlr) = &d.vhost else { continue };
            let p = CreateBlkController {
                ctrlr: ctrlr.clone(),
                dev_name: format!("{}/{}", vm.name, d.name),
                readonly: d.read_only,
                cpumask: None,
                packed_ring: false,
                transport: None,
                num_queues: None,
            };
            if let Err(e) = vhost.create(p) {
                log::error!(
                    "vm {} disk {}: vhost controller {ctrlr}: FAILED: {e} (other controllers continue)",
                    vm.name,
                    d.name
                );
            }
        }
    }
}

/// What the new process got.
pub struct Takeover {
    /// The old process's RPC listening socket.
    pub rpc_listener: Option<OwnedFd>,
    /// Its path.
    pub rpc_socket: PathBuf,
    /// Its live config.
    pub config: Option<JsonConfig>,
    /// Controllers taken over.
    pub controllers: Vec<String>,
    /// From hello to the controllers resumed here.
    pub stall: Duration,
    /// The part of it the old process spent draining requests already at its bdevs.
    pub drain: Duration,
}

/// The new process's side: connects to `path`, restores every controller into `vhost` (paused),
/// acknowledges, and resumes them once the old process has released them.
pub fn take_over(path: &Path, vhost: &VhostControl) -> Result<Takeover, String> {
    let s = UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    let _ = s.set_read_timeout(Some(STEP_TIMEOUT));
    let _ = s.set_write_timeout(Some(STEP_TIMEOUT));
    let t0 = Instant::now();
    send(
        &s,
        &Msg::Hello {
            pid: std::process::id(),
        },
        &[],
    )
    .map_err(|e| format!("hello: {e}"))?;
    let (state, mut fds) = recv(&s).map_err(|e| format!("state: {e}"))?;
    let (pid, config, rpc_socket, n, drained_us) = match state {
        Msg::State {
            pid,
            config,
            rpc_socket,
            controllers,
            drained_us,
        } => (pid, config, rpc_socket, controllers, drained_us),
        Msg::Error { error } => return Err(format!("the old process refused: {error}")),
        m => return Err(format!("expected state, got {m:?}")),
    };
    let rpc_listener = fds.pop();
    let mut restored = Vec::new();
    let result = (|| {
        for _ in 0..n {
            let (m, fds) = recv(&s).map_err(|e| format!("controller: {e}"))?;
            let Msg::Controller { params, snapshot } = m else {
                return Err(format!("expected a controller, got {m:?}"));
            };
            let name = params.ctrlr.clone();
            // Placement follows the bdev here (this process's reactors may differ).
            let p = CreateBlkController {
                cpumask: None,
                ..params
            };
            vhost
                .create_with(p, Some((*snapshot, FdIn::new(fds))))
                .map_err(|e| format!("controller {name}: {e}"))?;
            restored.push(name);
        }
        // First health check, while the old process still owns the guests: a failure here
        // rolls back (abort → the old one resumes) instead of leaving guests on a broken process.
        for name in &restored {
            vhost
                .health_check(name, HEALTH_TIMEOUT)
                .map_err(|e| format!("health check: {e}"))?;
        }
        if std::env::var_os(FAULT_ENV).is_some_and(|v| v == "health-check") {
            return Err(format!(
                "health check: failed on purpose ({FAULT_ENV}=health-check)"
            ));
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = send(&s, &Msg::Abort { error: e.clone() }, &[]);
        for n in &restored {
            let _ = vhost.on_controller(n, |c| c.release());
        }
        return Err(e);
    }
    send(&s, &Msg::Ready, &[]).map_err(|e| format!("ready: {e}"))?;
    match recv(&s) {
        Ok((Msg::Released, _)) => {}
        other => {
            // The old process may still own the rings: never touch them.
            for n in &restored {
                let _ = vhost.on_controller(n, |c| c.release());
            }
            return Err(format!("process {pid} did not release: {other:?}"));
        }
    }
    for n in &restored {
        if let Err(e) = vhost.on_controller(n, |c| c.resume()) {
            log::error!("takeover: resume {n}: {e}");
        }
    }
    let stall = t0.elapsed();
    log::info!(
        "takeover from process {pid}: {} controllers, IO paused for {stall:?}",
        restored.len()
    );
    Ok(Takeover {
        rpc_listener,
        rpc_socket,
        config: serde_json::from_value(config).ok(),
        controllers: restored,
        stall,
        drain: Duration::from_micros(drained_us),
    })
}
