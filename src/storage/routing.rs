//! Per-VM disk routing: the `[[vm]]` / `[[vm.disk]]` config, and the bdevs made from it.
//!
//! Every disk names its storage system (`system`, a registered backend type) and that system's
//! parameters. At start hostplane creates one bdev per disk, named `<vm>/<disk>`, and assigns it
//! a reactor; a disk whose system is unknown, whose parameters are wrong or whose server cannot be
//! reached is marked failed with the reason, and every other disk and VM carries on.
//!
//! ```toml
//! [[vm]]
//! name = "vm1"
//! [[vm.disk]]
//! name = "root"
//! system = "nbd"
//! params = { address = "unix:/run/nbd/vm1.sock", export = "root" }
//! [[vm.disk]]
//! name = "scratch"
//! system = "malloc"
//! params = { size_mib = 256 }
//! ```

use super::bdev::{Bdev, IoStat};
use super::manager::{QosSection, StorageControl};
use super::reactor::{ReactorOptions, ReactorSet, ReactorStats};
use super::registry::BackendRegistry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

/// `[[vm]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// VM name (unique).
    pub name: String,
    /// Its disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSection>,
}

/// `[[vm.disk]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Disk name (unique within the VM).
    pub name: String,
    /// Storage system: a registered backend type (`malloc`, `null`, `file`, `nbd`, ...).
    pub system: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Reactor index serving this disk (default: round robin).
    pub reactor: Option<u32>,
    /// Serve it over vhost-user-blk: the controller name (socket `<vhost dir>/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<String>,
    /// The storage system's parameters.
    #[serde(default)]
    pub params: toml::Table,
    /// QoS: limits in SPDK's units, weight, reservation, shared device (see docs/qos.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<super::manager::DiskQosSection>,
}

/// A VM file (`storage.vm_config`): only `[[vm]]` entries.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    /// VMs.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSection>,
}

impl VmFile {
    /// Reads a VM file.
    pub fn load(path: &Path) -> Result<VmFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read VM config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("VM config {}: {e}", path.display()))
    }
}

/// Checks names: VM names unique and non-empty, disk names unique within a VM, no `/`.
/// Storage systems and their parameters are not checked here: a bad disk fails alone at start.
pub fn validate(vms: &[VmSection]) -> Result<(), (String, String)> {
    let mut names = BTreeSet::new();
    for (i, vm) in vms.iter().enumerate() {
        if vm.name.is_empty() || vm.name.contains('/') {
            return Err((
                format!("vm[{i}].name"),
                "must be non-empty and contain no '/'".into(),
            ));
        }
        if !names.insert(vm.name.as_str()) {
            return Err((
                format!("vm[{i}].name"),
                format!("{:?} is used twice", vm.name),
            ));
        }
        let mut disks = BTreeSet::new();
        for (j, d) in vm.disks.iter().enumerate() {
            if d.name.is_empty() || d.name.contains('/') {
                return Err((
                    format!("vm[{i}].disk[{j}].name"),
                    "must be non-empty and contain no '/'".into(),
                ));
            }
            if !disks.insert(d.name.as_str()) {
                return Err((
                    format!("vm[{i}].disk[{j}].name"),
                    format!("{:?} is used twice in vm {:?}", d.name, vm.name),
                ));
            }
        }
    }
    Ok(())
}

/// One disk after start: its bdev and reactor, or why it failed.
#[derive(Debug)]
pub struct DiskRoute {
    /// VM name.
    pub vm: String,
    /// Disk name.
    pub disk: String,
    /// Storage system.
    pub system: String,
    /// Reactor serving it.
    pub reactor: u32,
    /// The bdev, or the reason the disk failed.
    pub bdev: Result<Arc<Bdev>, String>,
}

/// Every VM disk, routed.
#[derive(Debug, Default)]
pub struct Routing {
    /// Disks in config order.
    pub disks: Vec<DiskRoute>,
}

impl Routing {
    /// Creates the bdevs of every disk. Never fails as a whole: a disk that cannot be created is
    /// recorded (and logged) as failed. Blocking (NBD connects): call it off the reactors.
    pub fn build(vms: &[VmSection], registry: &BackendRegistry, reactors: u32) -> Routing {
        let mut disks = Vec::new();
        let mut rr = 0u32;
        for vm in vms {
            for d in &vm.disks {
                let reactor = match d.reactor {
                    Some(r) => r,
                    None => {
                        rr += 1;
                        (rr - 1) % reactors.max(1)
                    }
                };
                let name = format!("{}/{}", vm.name, d.name);
                let bdev = if reactor >= reactors.max(1) {
                    Err(format!(
                        "reactor {reactor} does not exist ({reactors} storage reactors)"
                    ))
                } else {
                    serde_json::to_value(&d.params)
                        .map_err(|e| e.to_string())
                        .and_then(|p| {
                            registry
                                .create(&d.system, &name, &p, d.read_only)
                                .map_err(|e| e.to_string())
                        })
                };
                match &bdev {
                    Ok(b) => {
                        log::info!(
                        "vm {} disk {}: {} bdev {name}, {} blocks of {} bytes{}, reactor {reactor}",
                        vm.name,
                        d.name,
                        d.system,
                        b.info().num_blocks,
                        b.info().block_size,
                        if b.info().read_only { ", read-only" } else { "" }
                    )
                    }
                    Err(e) => log::error!(
                        "vm {} disk {}: FAILED: {e} (other disks and VMs continue)",
                        vm.name,
                        d.name
                    ),
                }
                disks.push(DiskRoute {
                    vm: vm.name.clone(),
                    disk: d.name.clone(),
                    system: d.system.clone(),
                    reactor,
                    bdev,
                });
            }
        }
        Routing { disks }
    }

    /// The bdev serving `vm`'s disk `disk`, if it is up.
    pub fn route(&self, vm: &str, disk: &str) -> Option<(&Arc<Bdev>, u32)> {
        self.disks
            .iter()
            .find(|d| d.vm == vm && d.disk == disk)
            .and_then(|d| d.bdev.as_ref().ok().map(|b| (b, d.reactor)))
    }

    /// Disks that failed.
    pub fn failed(&self) -> impl Iterator<Item = &DiskRoute> {
        self.disks.iter().filter(|d| d.bdev.is_err())
    }

    /// IO statistics of every bdev that is up.
    pub fn iostat(&self) -> Vec<IoStat> {
        self.disks
            .iter()
            .filter_map(|d| d.bdev.as_ref().ok().map(|b| b.iostat()))
            .collect()
    }
}

/// The storage side of `hostplane run`: reactors on the storage lcores, the routed disks and
/// the control plane's storage table.
pub struct StorageRuntime {
    /// The reactors.
    pub reactors: ReactorSet,
    /// The disks of the config's `[[vm]]`s, as built at start.
    pub routing: Routing,
    /// Every bdev, for the RPC methods.
    pub control: Arc<StorageControl>,
}

/// Why the storage side could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Reactors.
    #[error("{0}")]
    Env(#[from] crate::env::EnvError),
    /// Reactors on threads.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// QoS settings.
    #[error("{0}")]
    Qos(#[from] super::manager::StorageError),
}

impl StorageRuntime {
    /// Creates the bdevs, then starts one reactor per storage lcore (or, with no storage lcore,
    /// one service reactor on a plain thread so the storage RPC methods still work) and installs
    /// each disk's QoS on its reactor.
    pub fn start(
        lcores: &[u32],
        main_lcore: u32,
        vms: &[VmSection],
        qos: &QosSection,
        opts: ReactorOptions,
    ) -> Result<StorageRuntime, StartError> {
        let registry = BackendRegistry::with_builtin();
        let routing = Routing::build(vms, &registry, lcores.len().max(1) as u32);
        let reactors = if lcores.is_empty() {
            // Not a data-path reactor: sleep when idle instead of spinning a core.
            let o = ReactorOptions {
                idle_sleep: Some(std::time::Duration::from_millis(1)),
                idle_spins: 100,
                ..opts
            };
            ReactorSet::spawn_threads(1, o)?
        } else {
            ReactorSet::launch_lcores(lcores, opts)?
        };
        let handles = (0..reactors.len())
            .filter_map(|i| reactors.handle(i))
            .collect();
        let control = StorageControl::new(handles, reactors.monitor(), main_lcore, qos)?;
        control.adopt(vms, &routing)?;
        Ok(StorageRuntime {
            reactors,
            routing,
            control,
        })
    }

    /// The table printed by `hostplane run`.
    pub fn report(&self, prev: &mut Vec<ReactorStats>, dt: f64) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let now = self.reactors.stats();
        prev.resize(now.len(), ReactorStats::default());
        for (r, p) in now.iter().zip(prev.iter_mut()) {
            let busy = r.busy.saturating_sub(p.busy);
            let idle = r.idle.saturating_sub(p.idle);
            let _ = writeln!(
                s,
                "  reactor {} lcore {}: busy {:.1}% (busy {} idle {} ticks), pollers {}",
                r.id,
                r.lcore.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                100.0 * busy as f64 / (busy + idle).max(1) as f64,
                r.busy,
                r.idle,
                r.pollers
            );
            *p = r.clone();
        }
        let _ = dt;
        for d in &self.routing.disks {
            match &d.bdev {
                Ok(b) => {
                    let st = b.iostat();
                    let _ = writeln!(
                        s,
                        "  disk {}/{} [{}] reactor {}: read {} ops {} B, write {} ops {} B, errors {}",
                        d.vm,
                        d.disk,
                        d.system,
                        d.reactor,
                        st.num_read_ops,
                        st.bytes_read,
                        st.num_write_ops,
                        st.bytes_written,
                        st.io_error.total()
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  disk {}/{} [{}]: FAILED: {e}", d.vm, d.disk, d.system);
                }
            }
        }
        s
    }

    /// Stops the reactors (each completes or fails its in-flight IO).
    pub fn stop(mut self) -> Vec<String> {
        self.reactors.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(text: &str) -> Vec<VmSection> {
        toml::from_str::<VmFile>(text).unwrap().vms
    }

    #[test]
    fn a_bad_disk_fails_alone() {
        let v = vms(r#"
[[vm]]
name = "a"
[[vm.disk]]
name = "d0"
system = "malloc"
params = { size_mib = 2 }
[[vm.disk]]
name = "d1"
system = "ceph"
[[vm]]
name = "b"
[[vm.disk]]
name = "d0"
system = "nbd"
params = { address = "unix:/nonexistent/nbd.sock", connect_timeout_ms = 200 }
[[vm.disk]]
name = "d1"
system = "malloc"
params = { size_mb = 2 }
[[vm.disk]]
name = "d2"
system = "null"
read_only = true
reactor = 1
params = { size_mib = 1 }
"#);
        validate(&v).unwrap();
        let r = Routing::build(&v, &BackendRegistry::with_builtin(), 2);
        assert_eq!(r.disks.len(), 5);
        let (b, reactor) = r.route("a", "d0").unwrap();
        assert_eq!((b.name(), b.info().size(), reactor), ("a/d0", 2 << 20, 0));
        let err = |vm: &str, d: &str| {
            r.disks
                .iter()
                .find(|x| x.vm == vm && x.disk == d)
                .unwrap()
                .bdev
                .as_ref()
                .unwrap_err()
                .clone()
        };
        assert!(
            err("a", "d1").contains("unknown storage system \"ceph\""),
            "{}",
            err("a", "d1")
        );
        assert!(
            err("b", "d0").contains("unix:/nonexistent/nbd.sock"),
            "{}",
            err("b", "d0")
        );
        assert!(err("b", "d1").contains("size_mb"), "{}", err("b", "d1"));
        let (n, reactor) = r.route("b", "d2").unwrap();
        assert!(n.info().read_only);
        assert_eq!(reactor, 1);
        assert_eq!(r.failed().count(), 3);
    }

    #[test]
    fn names_are_checked() {
        let dup = vms("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"a\"");
        assert_eq!(validate(&dup).unwrap_err().0, "vm[1].name");
        let dd = vms("[[vm]]\nname = \"a\"\n[[vm.disk]]\nname = \"x\"\nsystem = \"null\"\n[[vm.disk]]\nname = \"x\"\nsystem = \"null\"");
        assert_eq!(validate(&dd).unwrap_err().0, "vm[0].disk[1].name");
        assert!(toml::from_str::<VmFile>(
            "[[vm]]\nname = \"a\"\n[[vm.disk]]\nname = \"x\"\nsystem = \"null\"\nsize = 1"
        )
        .is_err());
    }
}
