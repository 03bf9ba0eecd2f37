//! The control plane's storage state: every bdev (created by RPC, by `vm_attach` or from the
//! config's `[[vm]]`s), the reactor that owns it, how it was made (for `save_config`), its QoS
//! settings, the QoS devices and the class table.
//!
//! This table lives on the control side behind a mutex (RPC threads only). What a reactor owns
//! (a bdev's QoS buckets and queue, a device's allocator) is changed only by sending that reactor
//! a message ([`ReactorHandle::call_timeout`]) and waiting for its answer; the RPC threads never
//! touch it. The mutex is held across those calls, so control operations are serialised; the
//! reactors never take it.

use super::bdev::Bdev;
use super::qos::{
    ClassTable, DeviceCapacity, DiskLimits, DiskQosConfig, DiskQosStats, QosLimitParams,
    Reservation, MIB,
};
use super::qos_gate::{self, QosDisk};
use super::reactor::{ReactorHandle, ReactorMonitor, ReactorStats};
use super::registry::BackendRegistry;
use super::routing::{Routing, VmSection};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a control operation waits for a reactor's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a storage control operation failed. Each maps to one JSON-RPC error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    /// A parameter is wrong; the message starts with its name.
    #[error("{0}")]
    Param(String),
    /// The bdev (or VM, or device) exists already.
    #[error("{0}")]
    Exists(String),
    /// The bdev is in use (open IO channels, a VM's disk, a device with disks).
    #[error("{0}")]
    Busy(String),
    /// A reactor did not answer, or a backend failed.
    #[error("{0}")]
    Internal(String),
}

type Result<T> = std::result::Result<T, StorageError>;

fn param(name: &str, msg: impl std::fmt::Display) -> StorageError {
    StorageError::Param(format!("{name}: {msg}"))
}

/// QoS settings of one disk in the config and RPC form: SPDK's `bdev_set_qos_limit` limits
/// (IOPS, MiB/s; 0 = unlimited), a weight (default: from the class table), a reservation and the
/// device it shares. Fields left out keep their value when applied to a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskQosSection {
    /// IOs per second (read + write); 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw_ios_per_sec: Option<u64>,
    /// MiB/s read + write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw_mbytes_per_sec: Option<u64>,
    /// MiB/s read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r_mbytes_per_sec: Option<u64>,
    /// MiB/s write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w_mbytes_per_sec: Option<u64>,
    /// Class weight (1..=2^20); 0 = back to the class table's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Reserved IOPS when contended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_ios_per_sec: Option<u64>,
    /// Reserved MiB/s when contended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_mbytes_per_sec: Option<u64>,
    /// The QoS device (`bdev_qos_set_device`) this disk shares; "" = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A disk's QoS as the control plane keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DiskQosState {
    limits: DiskLimits,
    weight: Option<u32>,
    reservation: Reservation,
    device: Option<String>,
}

impl DiskQosState {
    fn apply(&self, s: &DiskQosSection) -> DiskQosState {
        let limits = QosLimitParams {
            rw_ios_per_sec: s.rw_ios_per_sec,
            rw_mbytes_per_sec: s.rw_mbytes_per_sec,
            r_mbytes_per_sec: s.r_mbytes_per_sec,
            w_mbytes_per_sec: s.w_mbytes_per_sec,
        }
        .apply(self.limits);
        let mut r = self.reservation;
        if let Some(v) = s.reservation_ios_per_sec {
            r.ios_per_sec = v;
        }
        if let Some(v) = s.reservation_mbytes_per_sec {
            r.bytes_per_sec = v.saturating_mul(MIB);
        }
        DiskQosState {
            limits,
            weight: match s.weight {
                Some(0) => None,
                Some(w) => Some(w),
                None => self.weight,
            },
            reservation: r,
            device: match &s.device {
                Some(d) if d.is_empty() => None,
                Some(d) => Some(d.clone()),
                None => self.device.clone(),
            },
        }
    }

    fn section(&self) -> DiskQosSection {
        let p = QosLimitParams::from_limits(&self.limits);
        let nz = |v: Option<u64>| v.filter(|&x| x > 0);
        DiskQosSection {
            rw_ios_per_sec: nz(p.rw_ios_per_sec),
            rw_mbytes_per_sec: nz(p.rw_mbytes_per_sec),
            r_mbytes_per_sec: nz(p.r_mbytes_per_sec),
            w_mbytes_per_sec: nz(p.w_mbytes_per_sec),
            weight: self.weight,
            reservation_ios_per_sec: nz(Some(self.reservation.ios_per_sec)),
            reservation_mbytes_per_sec: nz(Some(self.reservation.bytes_per_sec / MIB)),
            device: self.device.clone(),
        }
    }

    fn config(&self, classes: &ClassTable) -> DiskQosConfig {
        DiskQosConfig {
            limits: self.limits,
            weight: self
                .weight
                .unwrap_or_else(|| classes.classify(&self.limits).weight),
            reservation: self.reservation,
        }
    }
}

/// Global QoS settings (`[storage.qos]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QosSection {
    /// Meter IO at all (default true). Off: limits are stored and reported but not enforced.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Slice length in microseconds (default 1000).
    #[serde(default = "default_slice_us")]
    pub slice_us: u64,
    /// The class table (default gold/silver/bronze by bandwidth).
    #[serde(default)]
    pub classes: Option<ClassTable>,
    /// Devices shared by disks.
    #[serde(default, rename = "device")]
    pub devices: Vec<QosDeviceSection>,
}

fn yes() -> bool {
    true
}
fn default_slice_us() -> u64 {
    1000
}

impl Default for QosSection {
    fn default() -> Self {
        QosSection {
            enabled: true,
            slice_us: default_slice_us(),
            classes: None,
            devices: Vec::new(),
        }
    }
}

/// One QoS device (`[[storage.qos.device]]`, or `bdev_qos_set_device`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosDeviceSection {
    /// Name disks refer to.
    pub name: String,
    /// Small-IO rate of the device (0 = no per-IO cost).
    #[serde(default)]
    pub ios_per_sec: u64,
    /// Large-IO bandwidth in MiB/s (0 = no per-byte cost).
    #[serde(default)]
    pub mbytes_per_sec: u64,
    /// Reactor running its allocator (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reactor: Option<u32>,
}

/// How to create one bdev.
#[derive(Debug, Clone)]
pub struct CreateBdev {
    /// Bdev name.
    pub name: String,
    /// Storage system (`malloc`, `null`, `file`, `nbd`).
    pub system: String,
    /// The system's params.
    pub params: Value,
    /// Refuse writes.
    pub read_only: bool,
    /// Owner reactor (default round robin).
    pub reactor: Option<u32>,
    /// QoS settings.
    pub qos: DiskQosSection,
    /// The RPC call that recreates it (`None` for VM disks: the VM's `vm_attach` does).
    pub saved_as: Option<(String, Value)>,
    /// UUID (default: derived from the name).
    pub uuid: Option<String>,
}

struct Entry {
    bdev: Arc<Bdev>,
    reactor: u32,
    system: String,
    params: Value,
    saved_as: Option<(String, Value)>,
    vm: Option<String>,
    uuid: String,
    qos: DiskQosState,
    /// (device, allocator slot) while on a device.
    device_slot: Option<(String, usize)>,
}

struct DeviceEntry {
    capacity: DeviceCapacity,
    reactor: u32,
}

struct State {
    bdevs: BTreeMap<String, Entry>,
    vms: BTreeMap<String, VmSection>,
    devices: BTreeMap<String, DeviceEntry>,
    classes: ClassTable,
    rr: u32,
}

/// The storage control plane (shared by the RPC threads).
pub struct StorageControl {
    registry: BackendRegistry,
    handles: Mutex<Vec<ReactorHandle>>,
    monitor: ReactorMonitor,
    main_lcore: u32,
    qos_enabled: bool,
    slice_ns: u64,
    state: Mutex<State>,
}

/// A UUID-shaped id derived from a name (stable across restarts).
pub fn name_uuid(name: &str) -> String {
    let h = |seed: u64| {
        name.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (h(0xcbf2_9ce4_8422_2325), h(0x8422_2325_cbf2_9ce4));
    let a = (a & !0xf000) | 0x4000; // version 4 layout
    let b = (b & !(0xc << 60)) | (0x8 << 60); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

impl StorageControl {
    /// Control over `handles` (one per reactor, index = reactor id).
    pub fn new(
        handles: Vec<ReactorHandle>,
        monitor: ReactorMonitor,
        main_lcore: u32,
        qos: &QosSection,
    ) -> Result<Arc<StorageControl>> {
        let slice_ns = qos.slice_us.saturating_mul(1000);
        super::qos::check_slice(slice_ns).map_err(|e| param("storage.qos.slice_us", e))?;
        let c = Arc::new(StorageControl {
            registry: BackendRegistry::with_builtin(),
            handles: Mutex::new(handles),
            monitor,
            main_lcore,
            qos_enabled: qos.enabled,
            slice_ns,
            state: Mutex::new(State {
                bdevs: BTreeMap::new(),
                vms: BTreeMap::new(),
                devices: BTreeMap::new(),
                classes: qos
                    .classes
                    .clone()
                    .unwrap_or_else(ClassTable::gold_silver_bronze),
                rr: 0,
            }),
        });
        for d in &qos.devices {
            c.set_device(d)?;
        }
        Ok(c)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reactors(&self) -> u32 {
        self.handles.lock().map(|h| h.len() as u32).unwrap_or(0)
    }

    /// A handle to reactor `i`.
    pub fn handle(&self, i: u32) -> Result<ReactorHandle> {
        self.handles
            .lock()
            .ok()
            .and_then(|h| h.get(i as usize).cloned())
            .ok_or_else(|| param("reactor", format!("no storage reactor {i}")))
    }

    fn call<R: Send + 'static>(
        &self,
        reactor: u32,
        f: impl FnOnce(&mut super::Reactor) -> R + Send + 'static,
    ) -> Result<R> {
        self.handle(reactor)?
            .call_timeout(CALL_TIMEOUT, f)
            .map_err(|e| StorageError::Internal(format!("storage reactor {reactor}: {e}")))
    }

    /// Whether QoS meters IO.
    pub fn qos_enabled(&self) -> bool {
        self.qos_enabled
    }

    /// The bdev named `name` and its owner reactor.
    pub fn bdev(&self, name: &str) -> Option<(Arc<Bdev>, u32)> {
        self.state()
            .bdevs
            .get(name)
            .map(|e| (e.bdev.clone(), e.reactor))
    }

    /// Creates a bdev, installs its QoS on its owner reactor and records it.
    pub fn create(&self, c: CreateBdev) -> Result<String> {
        let mut st = self.state();
        self.create_locked(&mut st, c, None)
    }

    fn create_locked(&self, st: &mut State, c: CreateBdev, vm: Option<String>) -> Result<String> {
        if c.name.is_empty() {
            return Err(param("name", "must not be empty"));
        }
        if st.bdevs.contains_key(&c.name) {
            return Err(StorageError::Exists(format!(
                "name: bdev {:?} already exists",
                c.name
            )));
        }
        let n = self.reactors().max(1);
        let reactor = match c.reactor {
            Some(r) if r >= n => {
                return Err(param(
                    "reactor",
                    format!("{r} does not exist ({n} storage reactors)"),
                ))
            }
            Some(r) => r,
            None => {
                st.rr = st.rr.wrapping_add(1);
                (st.rr - 1) % n
            }
        };
        let qos = DiskQosState::default().apply(&c.qos);
        if let Some(d) = &qos.device {
            if !st.devices.contains_key(d) {
                return Err(param("device", format!("no QoS device {d:?}")));
            }
        }
        let cfg = qos.config(&st.classes);
        let bdev = self
            .registry
            .create(&c.system, &c.name, &c.params, c.read_only)
            .map_err(|e| match e {
                super::BdevError::Params(m) | super::BdevError::UnknownType { name: m, .. } => {
                    StorageError::Param(m)
                }
                e => StorageError::Internal(e.to_string()),
            })?;
        let mut e = Entry {
            bdev: bdev.clone(),
            reactor,
            system: c.system.clone(),
            params: c.params.clone(),
            saved_as: c.saved_as,
            vm,
            uuid: c.uuid.unwrap_or_else(|| name_uuid(&c.name)),
            qos: qos.clone(),
            device_slot: None,
        };
        if self.qos_enabled {
            let slice = self.slice_ns;
            let id = bdev.id();
            self.call(reactor, move |r| -> std::result::Result<(), String> {
                qos_gate::install(r, id, QosDisk::new(cfg, slice)?);
                Ok(())
            })?
            .map_err(|m| param("weight", m))?;
            if let Some(d) = &qos.device {
                if let Err(err) = self.join(st, &mut e, d) {
                    let _ = self.call(reactor, move |r| qos_gate::uninstall(r, id));
                    return Err(err);
                }
            }
        }
        log::info!(
            "bdev {}: {} ({} blocks of {} B{}), reactor {reactor}",
            c.name,
            c.system,
            bdev.info().num_blocks,
            bdev.info().block_size,
            if bdev.info().read_only {
                ", read-only"
            } else {
                ""
            }
        );
        st.bdevs.insert(c.name.clone(), e);
        Ok(c.name)
    }

    /// Puts `e`'s disk on device `d` (allocator reactor first, then the disk's).
    fn join(&self, st: &State, e: &mut Entry, d: &str) -> Result<()> {
        let dev = st
            .devices
            .get(d)
            .ok_or_else(|| param("device", format!("no QoS device {d:?}")))?;
        let name = d.to_string();
        let ticket = self
            .call(dev.reactor, move |r| qos_gate::join_device(r, &name))?
            .map_err(|m| param("device", m))?;
        let slot = ticket.slot();
        let (id, slice) = (e.bdev.id(), self.slice_ns);
        self.call(e.reactor, move |r| {
            qos_gate::link_disk(r, id, Some(ticket), slice)
        })?;
        e.device_slot = Some((d.to_string(), slot));
        Ok(())
    }

    /// Takes `e`'s disk off its device.
    fn leave(&self, st: &State, e: &mut Entry) -> Result<()> {
        if let Some((d, slot)) = e.device_slot.take() {
            let (id, slice) = (e.bdev.id(), self.slice_ns);
            self.call(e.reactor, move |r| qos_gate::link_disk(r, id, None, slice))?;
            if let Some(dev) = st.devices.get(&d) {
                self.call(dev.reactor, move |r| qos_gate::leave_device(r, &d, slot))?;
            }
        }
        Ok(())
    }

    /// Deletes bdev `name`. `system`: the storage system the caller's method is for
    /// (`bdev_malloc_delete` only deletes malloc bdevs). A VM's disk is deleted by `vm_detach`.
    pub fn delete(&self, name: &str, system: Option<&str>) -> Result<()> {
        let mut st = self.state();
        let e = st
            .bdevs
            .get(name)
            .ok_or_else(|| param("name", format!("no bdev named {name:?}")))?;
        if let Some(s) = system {
            if e.system != s {
                return Err(param(
                    "name",
                    format!("bdev {name:?} is a {} bdev, not {s}", e.system),
                ));
            }
        }
        if let Some(vm) = &e.vm {
            return Err(StorageError::Busy(format!(
                "bdev {name:?} is in use: disk of vm {vm:?} (vm_detach it)"
            )));
        }
        self.delete_locked(&mut st, name)
    }

    fn delete_locked(&self, st: &mut State, name: &str) -> Result<()> {
        let Some(e) = st.bdevs.get(name) else {
            return Ok(());
        };
        let open = e.bdev.open_channels();
        if open > 0 {
            return Err(StorageError::Busy(format!(
                "bdev {name:?} is in use: {open} open IO channel(s)"
            )));
        }
        let Some(mut e) = st.bdevs.remove(name) else {
            return Ok(());
        };
        let _ = self.leave(st, &mut e);
        let id = e.bdev.id();
        if self.qos_enabled {
            self.call(e.reactor, move |r| qos_gate::uninstall(r, id))?;
        }
        log::info!("bdev {name}: deleted");
        Ok(())
    }

    /// `bdev_set_qos_limit`: changes limits (left-out params keep their value, 0 = off); the
    /// owner reactor applies them when the message runs.
    pub fn set_qos_limit(&self, name: &str, p: QosLimitParams) -> Result<()> {
        self.set_disk_qos(
            name,
            &DiskQosSection {
                rw_ios_per_sec: p.rw_ios_per_sec,
                rw_mbytes_per_sec: p.rw_mbytes_per_sec,
                r_mbytes_per_sec: p.r_mbytes_per_sec,
                w_mbytes_per_sec: p.w_mbytes_per_sec,
                ..Default::default()
            },
        )
    }

    /// Changes a disk's QoS settings (limits, weight, reservation, device).
    pub fn set_disk_qos(&self, name: &str, s: &DiskQosSection) -> Result<()> {
        let mut st = self.state();
        let mut e = st
            .bdevs
            .remove(name)
            .ok_or_else(|| param("name", format!("no bdev named {name:?}")))?;
        let r = self.update_qos(&st, &mut e, s);
        st.bdevs.insert(name.to_string(), e);
        r
    }

    fn update_qos(&self, st: &State, e: &mut Entry, s: &DiskQosSection) -> Result<()> {
        let new = e.qos.apply(s);
        if let Some(w) = new.weight {
            if !(1..=super::qos::MAX_WEIGHT).contains(&w) {
                return Err(param(
                    "weight",
                    format!("{w} not in 1..={}", super::qos::MAX_WEIGHT),
                ));
            }
        }
        if let Some(d) = &new.device {
            if !st.devices.contains_key(d) {
                return Err(param("device", format!("no QoS device {d:?}")));
            }
        }
        if self.qos_enabled {
            let cfg = new.config(&st.classes);
            let id = e.bdev.id();
            self.call(e.reactor, move |r| {
                qos_gate::with_disk(r, id, |d| d.set_config(cfg))
            })?
            .transpose()
            .map_err(|m| param("weight", m))?;
            if new.device != e.qos.device {
                self.leave(st, e)?;
                if let Some(d) = &new.device {
                    self.join(st, e, d)?;
                }
            }
        }
        e.qos = new;
        Ok(())
    }

    /// Creates or changes a QoS device (its allocator runs on `reactor`, default 0).
    pub fn set_device(&self, d: &QosDeviceSection) -> Result<()> {
        if d.name.is_empty() {
            return Err(param("name", "must not be empty"));
        }
        let mut st = self.state();
        let reactor = match (st.devices.get(&d.name), d.reactor) {
            (Some(old), Some(r)) if old.reactor != r => {
                return Err(param(
                    "reactor",
                    format!(
                        "device {:?} runs on reactor {}; delete it to move it",
                        d.name, old.reactor
                    ),
                ))
            }
            (Some(old), _) => old.reactor,
            (None, r) => r.unwrap_or(0),
        };
        self.handle(reactor)?;
        let capacity = DeviceCapacity {
            ios_per_sec: d.ios_per_sec,
            bytes_per_sec: d.mbytes_per_sec.saturating_mul(MIB),
        };
        let (name, slice) = (d.name.clone(), self.slice_ns);
        self.call(reactor, move |r| {
            qos_gate::set_device(r, &name, capacity, slice)
        })?
        .map_err(|m| param("name", m))?;
        st.devices
            .insert(d.name.clone(), DeviceEntry { capacity, reactor });
        Ok(())
    }

    /// Deletes a QoS device (no disk may be on it).
    pub fn delete_device(&self, name: &str) -> Result<()> {
        let mut st = self.state();
        let dev = st
            .devices
            .get(name)
            .ok_or_else(|| param("name", format!("no QoS device {name:?}")))?;
        if let Some((b, _)) = st
            .bdevs
            .iter()
            .find(|(_, e)| e.qos.device.as_deref() == Some(name))
        {
            return Err(StorageError::Busy(format!(
                "QoS device {name:?} is in use by bdev {b:?}"
            )));
        }
        let (n, reactor) = (name.to_string(), dev.reactor);
        self.call(reactor, move |r| qos_gate::remove_device(r, &n))?;
        st.devices.remove(name);
        Ok(())
    }

    /// Replaces the class table; disks without an explicit weight are reclassified.
    pub fn set_class_table(&self, t: ClassTable) -> Result<()> {
        let mut st = self.state();
        st.classes = t;
        if self.qos_enabled {
            for e in st.bdevs.values() {
                let cfg = e.qos.config(&st.classes);
                let id = e.bdev.id();
                self.call(e.reactor, move |r| {
                    qos_gate::with_disk(r, id, |d| d.set_config(cfg))
                })?
                .transpose()
                .map_err(StorageError::Internal)?;
            }
        }
        Ok(())
    }

    /// The class table.
    pub fn class_table(&self) -> ClassTable {
        self.state().classes.clone()
    }

    fn bdev_json(st: &State, name: &str, e: &Entry) -> Value {
        let info = e.bdev.info();
        let p = QosLimitParams::from_limits(&e.qos.limits);
        let product = match e.system.as_str() {
            "malloc" => "Malloc disk",
            "null" => "Null disk",
            "file" => "URING bdev",
            "nbd" => "NBD client",
            _ => "hostplane bdev",
        };
        let w = !info.read_only;
        let class = st.classes.classify(&e.qos.limits);
        json!({
            "name": name,
            "aliases": [],
            "product_name": product,
            "block_size": info.block_size,
            "num_blocks": info.num_blocks,
            "uuid": e.uuid,
            "assigned_rate_limits": {
                "rw_ios_per_sec": p.rw_ios_per_sec.unwrap_or(0),
                "rw_mbytes_per_sec": p.rw_mbytes_per_sec.unwrap_or(0),
                "r_mbytes_per_sec": p.r_mbytes_per_sec.unwrap_or(0),
                "w_mbytes_per_sec": p.w_mbytes_per_sec.unwrap_or(0),
            },
            "claimed": e.vm.is_some() || e.bdev.open_channels() > 0,
            "zoned": false,
            "supported_io_types": {
                "read": true, "write": w, "unmap": w, "write_zeroes": w, "flush": true,
                "reset": false, "nvme_admin": false, "nvme_io": false, "compare": false,
                "compare_and_write": false, "abort": false,
            },
            "driver_specific": {
                e.system.clone(): e.params,
                "hostplane": {
                    "system": e.system,
                    "reactor": e.reactor,
                    "vm": e.vm,
                    "read_only": info.read_only,
                    "open_channels": e.bdev.open_channels(),
                    "qos": {
                        "enabled": true,
                        "class": class.name,
                        "weight": e.qos.weight.unwrap_or(class.weight),
                        "reservation": e.qos.reservation,
                        "device": e.qos.device,
                    },
                },
            },
        })
    }

    /// `bdev_get_bdevs`: every bdev, or the one named.
    pub fn get_bdevs(&self, name: Option<&str>) -> Result<Value> {
        let st = self.state();
        let v: Vec<Value> = match name {
            Some(n) => {
                let e = st
                    .bdevs
                    .get(n)
                    .ok_or_else(|| param("name", format!("no bdev named {n:?}")))?;
                vec![Self::bdev_json(&st, n, e)]
            }
            None => st
                .bdevs
                .iter()
                .map(|(n, e)| Self::bdev_json(&st, n, e))
                .collect(),
        };
        Ok(Value::Array(v))
    }

    /// `bdev_get_iostat`: `{tick_rate, ticks, bdevs: [...]}` for every bdev or those named.
    pub fn iostat(&self, names: Option<&[String]>) -> Result<Value> {
        let st = self.state();
        let one = |e: &Entry| {
            let s = e.bdev.iostat();
            let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
            if let Some(m) = v.as_object_mut() {
                m.remove("tick_rate");
                for k in [
                    "bytes_copied",
                    "num_copy_ops",
                    "copy_latency_ticks",
                    "max_copy_latency_ticks",
                    "min_copy_latency_ticks",
                ] {
                    m.insert(k.into(), json!(0));
                }
            }
            v
        };
        let bdevs: Vec<Value> = match names {
            Some(list) => list
                .iter()
                .map(|n| {
                    st.bdevs
                        .get(n)
                        .map(one)
                        .ok_or_else(|| param("name", format!("no bdev named {n:?}")))
                })
                .collect::<Result<_>>()?,
            None => st.bdevs.values().map(one).collect(),
        };
        Ok(json!({"tick_rate": super::ticks_hz(), "ticks": super::ticks(), "bdevs": bdevs}))
    }

    /// `bdev_io`: `count` reads or writes of `len` bytes, `qd` at a time, from `offset` on
    /// (wrapping at the end), through a channel on the bdev's owner reactor, so QoS applies.
    /// For operators and tests; not a benchmark.
    pub fn io(
        &self,
        name: &str,
        write: bool,
        offset: u64,
        len: u64,
        count: u64,
        qd: usize,
    ) -> Result<Value> {
        let (bdev, reactor) = self
            .bdev(name)
            .ok_or_else(|| param("name", format!("no bdev named {name:?}")))?;
        let size = bdev.info().size();
        let bs = u64::from(bdev.info().block_size);
        if len == 0 || !len.is_multiple_of(bs) || len > size.min(16 << 20) {
            return Err(param(
                "length",
                format!("{len} must be a non-zero multiple of the block size {bs}, at most 16 MiB and the bdev size"),
            ));
        }
        if count > 1_000_000 {
            return Err(param("count", "at most 1000000"));
        }
        let client = super::client::BdevClient::open(&self.handle(reactor)?, &bdev)
            .map_err(|e| StorageError::Internal(e.to_string()))?;
        let t0 = std::time::Instant::now();
        let (mut ok, mut errors) = (0u64, 0u64);
        let data = vec![0x5au8; len as usize];
        let span = size / len * len;
        let mut pending = std::collections::VecDeque::new();
        let mut wait = |rx: crossbeam_channel::Receiver<super::client::Reply>| match rx
            .recv_timeout(Duration::from_secs(30))
        {
            Ok((st, _)) if st.is_ok() => ok += 1,
            _ => errors += 1,
        };
        for i in 0..count {
            let off = (offset.saturating_add(i.saturating_mul(len))) % span.max(1);
            let op = if write {
                super::client::Op::Write {
                    offset: off,
                    data: data.clone(),
                }
            } else {
                super::client::Op::Read { offset: off, len }
            };
            pending.push_back(client.submit(op));
            if pending.len() >= qd.max(1) {
                if let Some(rx) = pending.pop_front() {
                    wait(rx);
                }
            }
        }
        for rx in pending {
            wait(rx);
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(
            json!({"ios": ok, "errors": errors, "seconds": secs, "iops": ok as f64 / secs.max(1e-9)}),
        )
    }

    /// QoS counters of one bdev (or all), from their owner reactors.
    pub fn qos_stats(&self, name: Option<&str>) -> Result<Value> {
        let st = self.state();
        let mut out = Vec::new();
        for (n, e) in &st.bdevs {
            if name.is_some_and(|x| x != n) {
                continue;
            }
            let id = e.bdev.id();
            let s: Option<(DiskQosStats, DiskQosConfig)> = if self.qos_enabled {
                self.call(e.reactor, move |r| {
                    qos_gate::with_disk(r, id, |d| (d.stats(), d.config()))
                })?
            } else {
                None
            };
            let (stats, cfg) = s.unzip();
            out.push(json!({
                "name": n,
                "reactor": e.reactor,
                "device": e.qos.device,
                "weight": cfg.map(|c| c.weight),
                "limits": cfg.map(|c| c.limits),
                "stats": stats,
            }));
        }
        if let (Some(n), true) = (name, out.is_empty()) {
            return Err(param("name", format!("no bdev named {n:?}")));
        }
        let devices: Vec<Value> = st
            .devices
            .iter()
            .map(|(n, d)| json!({"name": n, "ios_per_sec": d.capacity.ios_per_sec, "mbytes_per_sec": d.capacity.bytes_per_sec / MIB, "reactor": d.reactor}))
            .collect();
        Ok(
            json!({"slice_us": self.slice_ns / 1000, "enabled": self.qos_enabled, "devices": devices, "bdevs": out}),
        )
    }

    /// `vm_attach`: creates a VM's disks (`vm/disk` bdevs), all or none. Attaching a VM that
    /// exists with the same disks only applies their QoS settings (so a saved config replays
    /// over the `[[vm]]`s of the config file).
    pub fn vm_attach(&self, vm: &VmSection) -> Result<Vec<String>> {
        super::routing::validate(std::slice::from_ref(vm)).map_err(|(f, m)| {
            StorageError::Param(format!("{}: {m}", f.trim_start_matches("vm[0].")))
        })?;
        let mut st = self.state();
        if let Some(old) = st.vms.get(&vm.name).cloned() {
            let same = old.disks.len() == vm.disks.len()
                && old.disks.iter().zip(&vm.disks).all(|(a, b)| {
                    a.name == b.name
                        && a.system == b.system
                        && a.params == b.params
                        && a.read_only == b.read_only
                });
            if !same {
                return Err(StorageError::Exists(format!(
                    "name: vm {:?} is attached with other disks (vm_detach it first)",
                    vm.name
                )));
            }
            let mut names = Vec::new();
            for d in &vm.disks {
                let bname = format!("{}/{}", vm.name, d.name);
                if let (Some(q), Some(mut e)) = (&d.qos, st.bdevs.remove(&bname)) {
                    let r = self.update_qos(&st, &mut e, q);
                    st.bdevs.insert(bname.clone(), e);
                    r?;
                }
                names.push(bname);
            }
            st.vms.insert(vm.name.clone(), vm.clone());
            return Ok(names);
        }
        let mut made = Vec::new();
        for (i, d) in vm.disks.iter().enumerate() {
            let r = serde_json::to_value(&d.params)
                .map_err(|e| param(&format!("disk[{i}].params"), e))
                .and_then(|params| {
                    self.create_locked(
                        &mut st,
                        CreateBdev {
                            name: format!("{}/{}", vm.name, d.name),
                            system: d.system.clone(),
                            params,
                            read_only: d.read_only,
                            reactor: d.reactor,
                            qos: d.qos.clone().unwrap_or_default(),
                            saved_as: None,
                            uuid: None,
                        },
                        Some(vm.name.clone()),
                    )
                });
            match r {
                Ok(n) => made.push(n),
                Err(e) => {
                    for n in &made {
                        let _ = self.delete_locked(&mut st, n);
                    }
                    let msg = e.to_string();
                    return Err(StorageError::Param(format!(
                        "disk[{i}] ({}): {msg}",
                        d.name
                    )));
                }
            }
        }
        st.vms.insert(vm.name.clone(), vm.clone());
        Ok(made)
    }

    /// `vm_detach`: deletes a VM's disks (refused while any is in use).
    pub fn vm_detach(&self, name: &str) -> Result<Vec<String>> {
        let mut st = self.state();
        let vm = st
            .vms
            .get(name)
            .cloned()
            .ok_or_else(|| param("name", format!("no vm named {name:?}")))?;
        let names: Vec<String> = vm
            .disks
            .iter()
            .map(|d| format!("{}/{}", vm.name, d.name))
            .filter(|n| st.bdevs.contains_key(n))
            .collect();
        for n in &names {
            let open = st.bdevs.get(n).map_or(0, |e| e.bdev.open_channels());
            if open > 0 {
                return Err(StorageError::Busy(format!(
                    "vm {name:?} is in use: bdev {n:?} has {open} open IO channel(s)"
                )));
            }
        }
        for n in &names {
            self.delete_locked(&mut st, n)?;
        }
        st.vms.remove(name);
        Ok(names)
    }

    /// Registers the disks of the config's `[[vm]]`s built at start (a failed disk is left out:
    /// it was logged, and the others carry on).
    pub fn adopt(&self, vms: &[VmSection], routing: &Routing) -> Result<()> {
        let mut st = self.state();
        for vm in vms {
            let mut up = vm.clone();
            up.disks.clear();
            for d in &vm.disks {
                let Some((bdev, reactor)) = routing.route(&vm.name, &d.name) else {
                    continue;
                };
                let qos = DiskQosState::default().apply(&d.qos.clone().unwrap_or_default());
                let mut e = Entry {
                    bdev: bdev.clone(),
                    reactor,
                    system: d.system.clone(),
                    params: serde_json::to_value(&d.params).unwrap_or(Value::Null),
                    saved_as: None,
                    vm: Some(vm.name.clone()),
                    uuid: name_uuid(bdev.name()),
                    qos: qos.clone(),
                    device_slot: None,
                };
                let name = bdev.name().to_string();
                let failed = |err: StorageError| {
                    log::error!("vm {} disk {}: QoS: {err}", vm.name, d.name);
                };
                if self.qos_enabled {
                    let (cfg, slice, id) = (qos.config(&st.classes), self.slice_ns, bdev.id());
                    match self.call(reactor, move |r| -> std::result::Result<(), String> {
                        qos_gate::install(r, id, QosDisk::new(cfg, slice)?);
                        Ok(())
                    }) {
                        Ok(Err(m)) => failed(StorageError::Param(m)),
                        Err(err) => failed(err),
                        Ok(Ok(())) => {
                            if let Some(dev) = &qos.device {
                                if let Err(err) = self.join(&st, &mut e, dev) {
                                    failed(err);
                                }
                            }
                        }
                    }
                }
                st.bdevs.insert(name, e);
                up.disks.push(d.clone());
            }
            st.vms.insert(vm.name.clone(), up);
        }
        Ok(())
    }

    /// The calls that recreate the storage state (`save_config`'s `bdev` subsystem): the class
    /// table, the QoS devices, each RPC-created bdev with its QoS, then each VM.
    pub fn save(&self) -> Vec<(String, Value)> {
        let st = self.state();
        let mut calls = Vec::new();
        calls.push((
            "bdev_qos_set_class_table".to_string(),
            serde_json::to_value(&st.classes).unwrap_or(Value::Null),
        ));
        for (n, d) in &st.devices {
            calls.push((
                "bdev_qos_set_device".into(),
                json!({"name": n, "ios_per_sec": d.capacity.ios_per_sec, "mbytes_per_sec": d.capacity.bytes_per_sec / MIB, "reactor": d.reactor}),
            ));
        }
        for (n, e) in &st.bdevs {
            let Some((method, params)) = &e.saved_as else {
                continue;
            };
            calls.push((method.clone(), params.clone()));
            // Limits as SPDK's own call; weight, reservation and device as hostplane's.
            let q = e.qos.section();
            let limits = DiskQosSection {
                rw_ios_per_sec: q.rw_ios_per_sec,
                rw_mbytes_per_sec: q.rw_mbytes_per_sec,
                r_mbytes_per_sec: q.r_mbytes_per_sec,
                w_mbytes_per_sec: q.w_mbytes_per_sec,
                ..Default::default()
            };
            let rest = DiskQosSection {
                weight: q.weight,
                reservation_ios_per_sec: q.reservation_ios_per_sec,
                reservation_mbytes_per_sec: q.reservation_mbytes_per_sec,
                device: q.device.clone(),
                ..Default::default()
            };
            for (method, part) in [("bdev_set_qos_limit", limits), ("bdev_qos_set_disk", rest)] {
                if part != DiskQosSection::default() {
                    let mut p = serde_json::to_value(&part).unwrap_or(json!({}));
                    p["name"] = json!(n);
                    calls.push((method.into(), p));
                }
            }
        }
        for vm in st.vms.values() {
            let mut vm = vm.clone();
            for d in vm.disks.iter_mut() {
                if let Some(e) = st.bdevs.get(&format!("{}/{}", vm.name, d.name)) {
                    let q = e.qos.section();
                    d.qos = (q != DiskQosSection::default()).then_some(q);
                }
            }
            calls.push((
                "vm_attach".into(),
                serde_json::to_value(&vm).unwrap_or(Value::Null),
            ));
        }
        calls
    }

    /// Per-reactor counters.
    pub fn reactor_stats(&self) -> Vec<ReactorStats> {
        self.monitor.stats()
    }

    /// `framework_get_reactors` lines of the storage reactors (SPDK's shape; busy/idle in TSC
    /// ticks). A reactor on a plain thread reports the main lcore.
    pub fn reactors_json(&self) -> Vec<Value> {
        let st = self.state();
        self.monitor
            .stats()
            .iter()
            .map(|r| {
                let lcore = r.lcore.unwrap_or(self.main_lcore);
                let bdevs: Vec<&String> = st
                    .bdevs
                    .iter()
                    .filter(|(_, e)| e.reactor == r.id)
                    .map(|(n, _)| n)
                    .collect();
                json!({
                    "lcore": lcore,
                    "busy": r.busy,
                    "idle": r.idle,
                    "in_interrupt": false,
                    "irq_counter": 0,
                    "lw_threads": [{
                        "name": format!("storage_reactor_{}", r.id),
                        "id": r.id,
                        "cpumask": format!("{:x}", 1u128 << lcore.min(127)),
                        "elapsed": r.busy + r.idle,
                    }],
                    "storage_reactor": r.id,
                    "thread": r.lcore.is_none(),
                    "bdevs": bdevs,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::client::BdevClient;
    use crate::storage::reactor::{ReactorOptions, ReactorSet};

    fn control(n: usize) -> (ReactorSet, Arc<StorageControl>) {
        let set = ReactorSet::spawn_threads(n, ReactorOptions::polite()).unwrap();
        let handles = (0..n).filter_map(|i| set.handle(i)).collect();
        let c = StorageControl::new(handles, set.monitor(), 0, &QosSection::default()).unwrap();
        (set, c)
    }

    fn malloc(name: &str) -> CreateBdev {
        CreateBdev {
            name: name.into(),
            system: "malloc".into(),
            params: json!({"num_blocks": 2048, "block_size": 512}),
            read_only: false,
            reactor: None,
            qos: DiskQosSection::default(),
            saved_as: Some((
                "bdev_malloc_create".into(),
                json!({"name": name, "num_blocks": 2048, "block_size": 512}),
            )),
            uuid: None,
        }
    }

    #[test]
    fn create_limit_delete_and_busy() {
        let (_set, c) = control(2);
        assert_eq!(c.create(malloc("M0")).unwrap(), "M0");
        assert!(matches!(
            c.create(malloc("M0")),
            Err(StorageError::Exists(_))
        ));
        c.set_qos_limit(
            "M0",
            QosLimitParams {
                rw_ios_per_sec: Some(7777),
                ..Default::default()
            },
        )
        .unwrap();
        let b = c.get_bdevs(Some("M0")).unwrap();
        assert_eq!(b[0]["assigned_rate_limits"]["rw_ios_per_sec"], 7777);
        assert_eq!(b[0]["num_blocks"], 2048);
        let (bdev, reactor) = c.bdev("M0").unwrap();
        let client = BdevClient::open(&c.handle(reactor).unwrap(), &bdev).unwrap();
        assert!(client.write(0, &[7u8; 512]).is_ok());
        assert_eq!(client.read(0, 512).unwrap(), vec![7u8; 512]);
        let e = c.delete("M0", Some("malloc")).unwrap_err();
        assert!(matches!(e, StorageError::Busy(_)), "{e}");
        drop(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while bdev.open_channels() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(c.delete("M0", Some("null")).is_err());
        c.delete("M0", Some("malloc")).unwrap();
        assert!(matches!(c.delete("M0", None), Err(StorageError::Param(_))));
        let st = c.qos_stats(None).unwrap();
        assert_eq!(st["bdevs"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn save_lists_rpc_bdevs_qos_and_vms() {
        let (_set, c) = control(1);
        c.set_device(&QosDeviceSection {
            name: "d0".into(),
            ios_per_sec: 1000,
            mbytes_per_sec: 0,
            reactor: None,
        })
        .unwrap();
        c.create(malloc("M1")).unwrap();
        c.set_disk_qos(
            "M1",
            &DiskQosSection {
                rw_ios_per_sec: Some(1234),
                weight: Some(3),
                device: Some("d0".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let vm: VmSection = serde_json::from_value(json!({"name": "vm1", "disk": [{"name": "root", "system": "null", "params": {"size_mib": 1}, "qos": {"rw_ios_per_sec": 500}}]})).unwrap();
        assert_eq!(c.vm_attach(&vm).unwrap(), vec!["vm1/root"]);
        assert!(c.vm_attach(&vm).is_ok(), "same VM again: no-op");
        assert!(matches!(
            c.delete("vm1/root", None),
            Err(StorageError::Busy(_))
        ));
        let calls = c.save();
        let methods: Vec<&str> = calls.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            methods,
            [
                "bdev_qos_set_class_table",
                "bdev_qos_set_device",
                "bdev_malloc_create",
                "bdev_set_qos_limit",
                "bdev_qos_set_disk",
                "vm_attach"
            ]
        );
        assert_eq!(calls[3].1["rw_ios_per_sec"], 1234);
        assert_eq!(calls[4].1["device"], "d0");
        assert_eq!(calls[4].1["weight"], 3);
        assert_eq!(calls[5].1["disk"][0]["qos"]["rw_ios_per_sec"], 500);
        let st = c.qos_stats(Some("M1")).unwrap();
        assert_eq!(st["bdevs"][0]["weight"], 3);
        assert!(c.delete_device("d0").is_err());
        assert_eq!(c.vm_detach("vm1").unwrap(), vec!["vm1/root"]);
        assert!(c.bdev("vm1/root").is_none());
    }
}
