//! `hostplane run`: start EAL, set up ports and the MAC-NAT table, launch a net loop on every
//! net lcore, print counters on the main lcore, stop cleanly on SIGINT/SIGTERM or --duration.

use crate::cli::{EalArgs, RunArgs};
use crate::config::{Config, ConfigError, LcorePlan};
use crate::control::methods::net::NetControl;
use crate::control::{self, JsonConfig, Registry, RpcListener, RpcServer};
use crate::env::ethdev::{RxQueue, TxQueue};
use crate::env::lcore::{self, LcoreHandle};
use crate::env::{Eal, EthPort, Mempool, PortConfig};
use crate::net::dataplane::{NetLcore, PortRole};
use crate::net::macnat::MacNatTable;
use crate::net::nat::Policy;
use crate::net::stats::{CountersSnapshot, LcoreCounters};
use crate::storage::convert::service::ConvertService;
use crate::storage::reactor::ReactorOptions;
use crate::storage::routing::{StorageRuntime, VmSection};
use crate::storage::vhost::service::ReactorSlot;
use crate::storage::vhost::VhostControl;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors at the CLI edge: any of the layers' typed errors, with context.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A port as the dataplane uses it.
#[derive(Clone, Debug)]
pub struct PortInfo {
    /// ethdev id.
    pub id: u16,
    /// Logical name (config `port.name`, or the device name).
    pub name: String,
    /// ethdev device name.
    pub device: String,
    /// Uplink or VM side.
    pub role: PortRole,
    /// Rx queues configured.
    pub rx_queues: u16,
}

/// A running dataplane: ports started, net lcores polling.
pub struct Dataplane {
    /// Ports in id order.
    pub ports: Vec<PortInfo>,
    /// The live MAC-NAT table (add/delete while traffic flows).
    pub table: MacNatTable,
    /// (lcore id, counters) of every net lcore.
    pub lcores: Vec<(u32, Arc<LcoreCounters>)>,
    stop: Arc<AtomicBool>,
    handles: Vec<LcoreHandle>,
    /// The storage side (reactors and routed VM disks), when the config has one.
    pub storage: Option<StorageRuntime>,
    /// rbd bdevs created over RPC.
    pub rbd: Arc<control::methods::rbd::RbdBdevs>,
    /// Online conversions started over RPC (one table: the RPC methods and the vhost lookup
    /// both see it).
    pub convert: Option<Arc<ConvertService>>,
    /// vhost-user-blk controllers (after [`Dataplane::start_vhost`]).
    pub vhost: Option<Arc<VhostControl>>,
    // Dropped last: EAL cleanup after lcores are joined and ports stopped.
    _eal: Eal,
}

/// What the network side started.
type NetSide = (
    Vec<PortInfo>,
    MacNatTable,
    Vec<(u32, Arc<LcoreCounters>)>,
    Vec<LcoreHandle>,
);

/// Free hugepages of the default size (0 when none are reserved).
pub fn hugepages_free() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Builds the EAL argument list for a config and lcore plan.
pub fn eal_args(cfg: &Config, plan: &LcorePlan, cli: &EalArgs) -> Vec<String> {
    let mut a = Vec::new();
    match (&cli.lcores, &cli.lcore_list, &cfg.eal.lcore_map) {
        (Some(map), None, _) => a.extend(["--lcores".to_string(), map.clone()]),
        (None, None, Some(map)) if cfg.eal.lcores.is_none() => {
            a.extend(["--lcores".to_string(), map.clone()])
        }
        _ => a.extend([
            "-l".to_string(),
            crate::lcores::format_lcore_list(&plan.eal),
        ]),
    }
    a.extend(["--main-lcore".to_string(), plan.main.to_string()]);
    for p in &cfg.ports {
        if let Some(args) = &p.args {
            a.extend(["--vdev".to_string(), format!("{},{}", p.device, args)]);
        }
    }
    a.extend(cfg.eal.args.iter().cloned());
    a.extend(cli.eal.iter().cloned());
    if !a.iter().any(|x| x == "--no-huge") && hugepages_free() == 0 {
        log::warn!("no free hugepages: running with --no-huge --no-shconf (about 2x slower); reserve some with `hugepage-setup config --pages 1024`");
        a.extend(["--no-huge".to_string(), "--no-shconf".to_string()]);
        if !a.iter().any(|x| x == "-m" || x.starts_with("--socket-mem")) {
            a.extend(["-m".to_string(), "512".to_string()]);
        }
    }
    a
}

impl Dataplane {
    /// Starts EAL, ports and net lcores from a validated config.
    pub fn start(cfg: &Config, cli: &EalArgs) -> Result<Dataplane, Error> {
        cfg.validate_static()?;
        let plan = cfg.lcore_plan(
            cli.lcore_list.as_deref(),
            cli.lcores.as_deref(),
            cli.main_lcore,
        )?;
        let args = eal_args(cfg, &plan, cli);
        log::info!("EAL arguments: {}", args.join(" "));
        let eal = Eal::init(&args)?;
        for (name, set) in [("net.lcores", &plan.net), ("storage.lcores", &plan.storage)] {
            if let Some(l) = set.iter().find(|l| !eal.lcore_enabled(**l)) {
                return Err(ConfigError::Field {
                    field: name.into(),
                    msg: format!("lcore {l} is not enabled in EAL"),
                }
                .into());
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        // The network side is optional: a storage-only config has no net lcores.
        let (ports, table, lcores, handles) = if plan.net.is_empty() {
            (
                Vec::new(),
                MacNatTable::new(&[], 1)?,
                Vec::new(),
                Vec::new(),
            )
        } else {
            start_net(cfg, &plan, &stop)?
        };
        // Without storage lcores, one service reactor on a thread still backs the storage RPCs.
        let storage = {
            let drain = Duration::from_millis(cfg.storage.drain_timeout_ms.unwrap_or(5000));
            let opts = ReactorOptions {
                drain_timeout: drain,
                ..ReactorOptions::default()
            };
            let st =
                StorageRuntime::start(&plan.storage, plan.main, &cfg.vms, &cfg.storage.qos, opts)?;
            if plan.storage.is_empty() {
                log::info!("storage: no storage lcores; one service reactor on a thread for the storage RPC methods");
            } else {
                log::info!(
                    "storage: {} reactors on lcores {:?}, {} disks ({} failed)",
                    st.reactors.len(),
                    plan.storage,
                    st.routing.disks.len(),
                    st.routing.failed().count()
                );
            }
            Some(st)
        };
        let convert = storage.as_ref().map(|st| {
            ConvertService::new(
                (0..st.reactors.len())
                    .filter_map(|i| st.reactors.handle(i))
                    .collect(),
            )
        });
        Ok(Dataplane {
            ports,
            table,
            lcores,
            stop,
            handles,
            storage,
            rbd: Arc::default(),
            convert,
            vhost: None,
            _eal: eal,
        })
    }
}

/// Starts ports and net lcores.
fn start_net(cfg: &Config, plan: &LcorePlan, stop: &Arc<AtomicBool>) -> Result<NetSide, Error> {
    // Resolve ports: from the config, or every ethdev EAL created (first = uplink).
    let mut ports = Vec::new();
    if cfg.ports.is_empty() {
        let all = EthPort::all();
        if all.is_empty() {
            return Err("no ports: give [[port]] entries in the config, or vdevs after `--` (e.g. -- --vdev net_null0 --vdev net_null1)".into());
        }
        for (i, p) in all.iter().enumerate() {
            let role = if i == 0 {
                PortRole::Uplink
            } else {
                PortRole::Vm
            };
            ports.push(PortInfo {
                id: p.id(),
                name: p.name(),
                device: p.name(),
                role,
                rx_queues: 0,
            });
        }
    } else {
        let avail: Vec<String> = EthPort::all().iter().map(|p| p.name()).collect();
        for (i, pc) in cfg.ports.iter().enumerate() {
            let p = EthPort::by_name(&pc.device).map_err(|_| ConfigError::Field {
                field: format!("port[{i}].device"),
                msg: format!(
                    "no ethdev named {:?} (available: {})",
                    pc.device,
                    if avail.is_empty() {
                        "none".into()
                    } else {
                        avail.join(", ")
                    }
                ),
            })?;
            ports.push(PortInfo {
                id: p.id(),
                name: pc.name.clone(),
                device: pc.device.clone(),
                role: pc.role,
                rx_queues: 0,
            });
        }
    }
    let uplink = ports
        .iter()
        .find(|p| p.role == PortRole::Uplink)
        .map(|p| p.id)
        .ok_or("no uplink port")?;
    let max_id = ports.iter().map(|p| p.id as usize).max().unwrap_or(0);
    if max_id >= crate::net::stats::MAX_PORTS {
        return Err(format!(
            "port id {max_id} is beyond the {} ports hostplane supports",
            crate::net::stats::MAX_PORTS
        )
        .into());
    }
    // Name, device name or id (saved configs use names; hand-written ones may not).
    let find_port = |name: &str| {
        ports
            .iter()
            .find(|p| {
                (p.name == name || p.device == name || p.id.to_string() == name)
                    && p.role == PortRole::Vm
            })
            .map(|p| p.id)
    };
    let flood_port = match &cfg.net.flood_port {
        Some(n) => find_port(n),
        None => ports.iter().find(|p| p.role == PortRole::Vm).map(|p| p.id),
    };
    let entries = cfg.macnat_entries(find_port)?;
    let policy = Policy {
        uplink,
        flood_port,
        unknown_ip: cfg.net.unknown_ip,
        spoofed: cfg.net.spoofed,
        control: cfg.net.control,
    };

    // Queues: one rx queue per net lcore (as many as the driver allows) and one tx queue per
    // net lcore on every port, so no two lcores ever share a queue.
    let n = plan.net.len() as u16;
    let nb_mbufs = (ports.len() as u32) * u32::from(n) * 2 * 1024 + 8192;
    let pool = Mempool::pktmbuf("hp_mbufs", nb_mbufs, 256, 2048 + 128, -1)?;
    let mut rx_by_lcore: Vec<Vec<(RxQueue, PortRole)>> = (0..n).map(|_| Vec::new()).collect();
    let mut tx_by_lcore: Vec<Vec<Option<TxQueue>>> = (0..n)
        .map(|_| (0..=max_id).map(|_| None).collect())
        .collect();
    for p in ports.iter_mut() {
        let dev = EthPort::from_id(p.id)?;
        let (max_rx, max_tx) = dev.max_queues()?;
        if max_tx < n {
            return Err(format!("port {} ({}) supports {max_tx} tx queues; hostplane needs one per net lcore ({n}): use fewer net lcores", p.name, p.device).into());
        }
        let rxq = n.min(max_rx).max(1);
        let pc = PortConfig {
            rx_queues: rxq,
            tx_queues: n,
            rx_desc: 1024,
            tx_desc: 1024,
            promiscuous: true,
        };
        let (rx, tx) = dev.configure(&pc, pool)?;
        for (i, q) in rx.into_iter().enumerate() {
            rx_by_lcore[i].push((q, p.role));
        }
        for (i, q) in tx.into_iter().enumerate() {
            tx_by_lcore[i][p.id as usize] = Some(q);
        }
        dev.start()?;
        p.rx_queues = rxq;
        let link = dev.link();
        let mac = dev.mac();
        log::info!(
            "port {} {} ({}, {}): {:?}, {} rx / {n} tx queues, mac {}, link {}",
            p.id,
            p.name,
            p.device,
            dev.driver(),
            p.role,
            rxq,
            crate::net::packet::MacAddr(mac),
            if link.up {
                format!("up {} Mbps", link.speed_mbps)
            } else {
                "down".into()
            }
        );
    }

    let table = MacNatTable::new(&entries, plan.net.len())?;
    let mut lcores = Vec::new();
    let mut handles = Vec::new();
    for (i, (rx, tx)) in rx_by_lcore.into_iter().zip(tx_by_lcore).enumerate() {
        let counters = Arc::new(LcoreCounters::default());
        let reader = table
            .reader(i)
            .ok_or("table has fewer reader slots than net lcores")?;
        let worker = NetLcore {
            rx,
            tx,
            policy,
            table: reader,
            counters: counters.clone(),
        };
        let worker_stop = stop.clone();
        let lcore_id = plan.net[i];
        match lcore::launch(lcore_id, move || worker.run(&worker_stop)) {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The lcores already launched poll until told to stop; their handles join
                // them when dropped on this return.
                stop.store(true, Ordering::SeqCst);
                return Err(e.into());
            }
        }
        lcores.push((lcore_id, counters));
    }
    Ok((ports, table, lcores, handles))
}

impl Dataplane {
    /// Sum of every lcore's counters.
    pub fn totals(&self) -> CountersSnapshot {
        let mut t = CountersSnapshot::default();
        for (_, c) in &self.lcores {
            t.add(&c.snapshot());
        }
        t
    }

    /// Stops the net lcores, then the ports. Returns the final totals.
    pub fn stop(mut self) -> Result<CountersSnapshot, Error> {
        let failed = self.halt();
        let totals = self.totals();
        if !failed.is_empty() {
            return Err(failed.join("; ").into());
        }
        Ok(totals)
    }

    /// Joins the net lcores (after telling them to stop), stops the storage reactors and the
    /// ports; returns the failures. Does nothing the second time.
    fn halt(&mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        // Its reactor handles hold the reactors' rings, which must go before EAL (RPC threads
        // may still hold the control itself).
        if let Some(v) = self.vhost.take() {
            v.shutdown();
        }
        let mut failed: Vec<String> = self
            .handles
            .drain(..)
            .filter_map(|h| h.join().err())
            .collect();
        if let Some(st) = self.storage.take() {
            failed.extend(st.stop());
        }
        for p in self.ports.drain(..) {
            if let Ok(dev) = EthPort::from_id(p.id) {
                let _ = dev.stop();
            }
        }
        failed
    }

    /// The JSON-RPC methods of this dataplane: framework, network and storage.
    pub fn registry(&self) -> Registry {
        let mut reg = Registry::new();
        let storage = self.storage.as_ref().map(|s| s.control.clone());
        control::methods::framework::register(
            &mut reg,
            crate::env::tsc_hz(),
            self.lcores.clone(),
            storage.clone(),
        );
        let net = NetControl {
            table: self.table.clone(),
            ports: self.ports.clone(),
            lcores: self.lcores.clone(),
        };
        control::methods::net::register(&mut reg, Arc::new(net));
        // After macnat, so save_config lists the bdev subsystem second.
        if let Some(st) = storage {
            control::methods::storage::register(&mut reg, st);
        }
        control::methods::rbd::register(&mut reg, self.rbd.clone());
        if let Some(c) = &self.convert {
            control::methods::convert::register(&mut reg, c.clone());
        }
        // After bdev, so save_config recreates controllers after their bdevs.
        if let Some(v) = &self.vhost {
            control::methods::vhost::register(&mut reg, v.clone());
        }
        // bdev_pause / bdev_resume / bdev_upgrade / bdev_get_service_stats: VM disks and rbd bdevs.
        let disks: Vec<_> = self
            .storage
            .iter()
            .flat_map(|st| {
                st.routing
                    .disks
                    .iter()
                    .filter_map(|d| d.bdev.as_ref().ok().cloned())
            })
            .collect();
        let rbd = self.rbd.clone();
        control::methods::upgrade::register(
            &mut reg,
            Arc::new(move || disks.iter().cloned().chain(rbd.list()).collect()),
        );
        reg
    }

    /// Starts the vhost-user-blk control plane (sockets in `dir`) and the controllers the config
    /// declares (`vhost = "name"` on a `[[vm.disk]]`). A controller that cannot be created is
    /// logged and the others carry on, like a failed disk. Controllers can serve the VM disks
    /// and the rbd bdevs created over RPC.
    pub fn start_vhost(&mut self, dir: &Path, vms: &[VmSection]) {
        let (slots, disks) = match &self.storage {
            Some(st) => {
                let slots = st
                    .reactors
                    .stats()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        Some(ReactorSlot {
                            handle: st.reactors.handle(i)?,
                            core: s.lcore.unwrap_or(i as u32),
                        })
                    })
                    .collect();
                let disks: Vec<_> = st
                    .routing
                    .disks
                    .iter()
                    .filter_map(|d| d.bdev.as_ref().ok().map(|b| (b.clone(), d.reactor)))
                    .collect();
                (slots, disks)
            }
            None => (Vec::new(), Vec::new()),
        };
        let rbd = self.rbd.clone();
        let convert = self.convert.clone();
        let lookup = Arc::new(move |name: &str| {
            disks
                .iter()
                .find(|(b, _)| b.name() == name)
                .cloned()
                // No owner reactor: the controller goes to the first one (or its cpumask).
                .or_else(|| rbd.get(name).map(|b| (b, u32::MAX)))
                // A convert bdev's channels must be opened on the reactor that owns it.
                .or_else(|| convert.as_ref().and_then(|c| c.bdev(name)))
        });
        let vhost = Arc::new(VhostControl::new(dir, slots, lookup));
        crate::handover::create_config_controllers(&vhost, vms);
        self.vhost = Some(vhost);
    }

    /// The counters table printed each interval: one line per lcore and per port.
    pub fn report(&self, elapsed: f64, dt: f64, prev: &mut Vec<CountersSnapshot>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "--- t={elapsed:.1}s");
        if let Some(st) = &self.storage {
            s.push_str(&st.report(&mut Vec::new(), dt));
        }
        if self.lcores.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "  {:<8} {:>12} {:>12} {:>10} {:>12} {:>12} {:>10} {:>10} {:>6}",
            "lcore",
            "rx",
            "tx",
            "rx-Mpps",
            "egress-nat",
            "ingress-nat",
            "untouched",
            "dropped",
            "busy%"
        );
        prev.resize(self.lcores.len(), CountersSnapshot::default());
        let mut totals = CountersSnapshot::default();
        for ((id, c), p) in self.lcores.iter().zip(prev.iter_mut()) {
            let now = c.snapshot();
            let dpolls = now.polls.saturating_sub(p.polls).max(1);
            let busy = 100.0 * now.busy_polls.saturating_sub(p.busy_polls) as f64 / dpolls as f64;
            let _ = writeln!(
                s,
                "  {:<8} {:>12} {:>12} {:>10.3} {:>12} {:>12} {:>10} {:>10} {:>6.1}",
                id,
                now.rx,
                now.tx,
                if dt > 0.0 {
                    now.rx.saturating_sub(p.rx) as f64 / dt / 1e6
                } else {
                    0.0
                },
                now.egress_translated,
                now.ingress_translated,
                now.untouched,
                now.dropped(),
                busy
            );
            totals.add(&now);
            *p = now;
        }
        for port in &self.ports {
            let (rx, tx) = totals
                .ports
                .get(port.id as usize)
                .copied()
                .unwrap_or((0, 0));
            let hw = EthPort::from_id(port.id)
                .ok()
                .and_then(|d| d.stats().ok())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  port {} {:<10} {:<6} rx {:>12} tx {:>12}  (driver: ipackets {} opackets {} imissed {} ierrors {} oerrors {} rx_nombuf {})",
                port.id,
                port.name,
                match port.role {
                    PortRole::Uplink => "uplink",
                    PortRole::Vm => "vm",
                },
                rx,
                tx,
                hw.ipackets,
                hw.opackets,
                hw.imissed,
                hw.ierrors,
                hw.oerrors,
                hw.rx_nombuf
            );
        }
        if totals.dropped() > 0 {
            let mut d: Vec<String> = totals
                .drops
                .iter()
                .map(|(n, c)| format!("{n}={c}"))
                .collect();
            if totals.tx_full > 0 {
                d.push(format!("tx_full={}", totals.tx_full));
            }
            let _ = writeln!(s, "  drops: {}", d.join(" "));
        }
        s
    }
}

impl Drop for Dataplane {
    /// A Dataplane dropped without [`Dataplane::stop`] (an early return, a panic) must not hang:
    /// each `LcoreHandle` and the `Eal` wait for their lcores, which poll until told to stop.
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// `hostplane run`.
pub fn run(args: &RunArgs) -> Result<(), Error> {
    let (mut cfg, _tmp) = match &args.config {
        Some(path) => (Config::load(path)?, None),
        // Ports given as vdevs on the command line: use them (first = uplink), no table.
        None if args
            .eal
            .eal
            .iter()
            .any(|a| a == "--vdev" || a.starts_with("--vdev=")) =>
        {
            (Config::default(), None)
        }
        None => {
            let (cfg, dir) = crate::runtime::embedded_default()?;
            log::info!("no --config: running the embedded default (net_pcap ports replaying generated traffic from {})", dir.display());
            (cfg, Some(TempDir(dir)))
        }
    };
    // Everything that can fail without EAL fails first: the saved config, the socket.
    let saved = match &args.json {
        Some(path) => Some(JsonConfig::read(path)?),
        None => None,
    };
    if let Some(calls) = saved.as_ref().and_then(|s| s.subsystem("macnat")) {
        cfg.macnat =
            control::methods::net::startup_entries(calls.config.as_deref().unwrap_or_default())?;
        log::info!(
            "--json: {} MAC-NAT entries (replacing the config file's)",
            cfg.macnat.len()
        );
        cfg.validate_static()?;
    }
    // Taking over: the old process's RPC socket is live and comes with the handover.
    let listener = match &args.takeover {
        Some(_) => None,
        None => Some(RpcListener::bind(&args.rpc_socket)?),
    };
    crate::signals::install();
    let mut dp = Dataplane::start(&cfg, &args.eal)?;
    // Controllers of a takeover come from the old process, not from the config.
    dp.start_vhost(
        &args.vhost_dir,
        if args.takeover.is_some() {
            &[]
        } else {
            &cfg.vms
        },
    );
    let registry = Arc::new(dp.registry());
    let listener = match (&args.takeover, listener) {
        (_, Some(l)) => l,
        (Some(h), None) => {
            let vhost = dp.vhost.clone().ok_or("takeover: no vhost control")?;
            let t = crate::handover::take_over(h, &vhost)
                .map_err(|e| format!("takeover via {}: {e}", h.display()))?;
            println!(
                "takeover: {} controllers from the old process, guest IO paused {:.1} ms (drain {:.1} ms)",
                t.controllers.len(),
                t.stall.as_secs_f64() * 1e3,
                t.drain.as_secs_f64() * 1e3
            );
            crate::handover::create_config_controllers(&vhost, &cfg.vms);
            match t.rpc_listener {
                Some(fd) => RpcListener::from_fd(fd, &t.rpc_socket)?,
                None => RpcListener::bind(&args.rpc_socket)?,
            }
        }
        (None, None) => unreachable!("bound above without --takeover"),
    };
    if let Some(saved) = &saved {
        let n = registry.load(saved, &["macnat"]).map_err(|e| {
            format!(
                "--json {}: {}",
                args.json.as_deref().unwrap_or(Path::new("")).display(),
                e.message
            )
        })?;
        log::info!("--json: replayed {n} calls");
    }
    let server = RpcServer::start(listener, registry.clone(), control::Limits::default())?;
    let handed_over = Arc::new(AtomicBool::new(false));
    let handover_path = args
        .handover_socket
        .clone()
        .unwrap_or_else(|| crate::handover::default_socket(server.path()));
    let _handover = crate::handover::serve(
        &handover_path,
        crate::handover::OldSide {
            vhost: dp.vhost.clone(),
            registry,
            rpc_fd: server.listener_fd(),
            rpc_socket: server.path().to_path_buf(),
            handed_over: handed_over.clone(),
        },
    )?;
    log::info!("handover socket {}", handover_path.display());
    log::info!("JSON-RPC on {}", server.path().display());
    let started = Instant::now();
    let interval = if args.stats_interval > 0.0 {
        Some(Duration::from_secs_f64(args.stats_interval))
    } else {
        None
    };
    let mut next = interval.map(|i| started + i);
    let mut prev = Vec::new();
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if crate::signals::stop_requested() {
            log::info!("signal received: stopping");
            break;
        }
        if handed_over.load(Ordering::SeqCst) {
            log::info!(
                "handed over to the new process: exiting without closing anything guests see"
            );
            server.keep_socket();
            break;
        }
        if args
            .duration
            .is_some_and(|d| now.duration_since(started).as_secs_f64() >= d)
        {
            break;
        }
        if let (Some(n), Some(i)) = (next, interval) {
            if now >= n {
                let dt = now.duration_since(last).as_secs_f64();
                print!(
                    "{}",
                    dp.report(now.duration_since(started).as_secs_f64(), dt, &mut prev)
                );
                last = now;
                next = Some(n + i);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut zero = Vec::new();
    let summary = dp.report(elapsed, elapsed, &mut zero);
    // The RPC threads hold port and table handles: stop them before the ports.
    server.stop();
    let totals = dp.stop()?;
    println!("=== summary after {elapsed:.1}s");
    print!("{summary}");
    println!(
        "total: rx {} tx {} egress-nat {} ingress-nat {} untouched {} dropped {}",
        totals.rx,
        totals.tx,
        totals.egress_translated,
        totals.ingress_translated,
        totals.untouched,
        totals.dropped()
    );
    Ok(())
}

/// Removes the embedded default's temp dir on exit.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The embedded default: an uplink and a VM port on `net_pcap`, each replaying (forever) a
/// generated capture, two VMs in the MAC-NAT table. Transmitted frames are discarded by
/// net_pcap (no tx_pcap given), so it runs at full speed without filling a disk.
pub fn embedded_default() -> Result<(Config, PathBuf), Error> {
    use crate::net::frames;
    use crate::net::packet::MacAddr;
    let dir = std::env::temp_dir().join(format!("hostplane-default-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let vm_local = [
        MacAddr([0x52, 0x54, 0, 0, 0, 2]),
        MacAddr([0x52, 0x54, 0, 0, 0, 3]),
    ];
    let global = MacAddr([0x02, 0, 0, 0, 0, 1]);
    let router = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);
    let vm_ip = [[10, 0, 0, 2], [10, 0, 0, 3]];
    let remote = [10, 0, 0, 1];
    let mut vm_frames = Vec::new();
    let mut up_frames = Vec::new();
    for i in 0..2 {
        vm_frames.push(frames::ipv4_udp(router, vm_local[i], vm_ip[i], remote, 60));
        vm_frames.push(frames::arp(
            MacAddr([0xff; 6]),
            vm_local[i],
            1,
            vm_local[i],
            vm_ip[i],
            MacAddr([0; 6]),
            remote,
        ));
        up_frames.push(frames::ipv4_udp(global, router, remote, vm_ip[i], 60));
        up_frames.push(frames::arp(
            global, router, 2, router, remote, global, vm_ip[i],
        ));
    }
    let vm_pcap = dir.join("vm0-rx.pcap");
    let up_pcap = dir.join("uplink-rx.pcap");
    crate::net::pcap::write_frames(&vm_pcap, &vm_frames)?;
    crate::net::pcap::write_frames(&up_pcap, &up_frames)?;
    let toml = format!(
        r#"
[eal]
args = ["--no-pci"]

[[port]]
name = "uplink"
device = "net_pcap0"
args = "rx_pcap={up},infinite_rx=1"
role = "uplink"

[[port]]
name = "vm0"
device = "net_pcap1"
args = "rx_pcap={vm},infinite_rx=1"
role = "vm"

[[macnat]]
ip = "10.0.0.2"
local_mac = "52:54:00:00:00:02"
global_mac = "02:00:00:00:00:01"
port = "vm0"

[[macnat]]
ip = "10.0.0.3"
local_mac = "52:54:00:00:00:03"
global_mac = "02:00:00:00:00:01"
port = "vm0"
"#,
        up = up_pcap.display(),
        vm = vm_pcap.display()
    );
    Ok((Config::parse(&toml, "embedded default")?, dir))
}
