//! QoS on the IO path: [`DiskQos`] in front of a bdev's submissions, on the bdev's reactor.
//!
//! Who owns what (SPDK's model, no locks on the IO path):
//! - Every bdev is owned by one reactor. That reactor's [`QosTable`] (a reactor-local value, see
//!   [`Reactor::local`]) holds the bdev's [`QosDisk`]: its limit buckets, its FIFO queue and its
//!   slice timer. Every [`IoChannel`](super::IoChannel) opened on the owner reactor shares it,
//!   so the limits hold for the bdev as a whole however many channels it has there.
//! - An IO over its limits waits in the disk's queue and is submitted to the backend by a later
//!   `IoChannel::poll`; QoS never fails an IO. A channel that closes fails (aborts) only its own
//!   queued IOs.
//! - A device shared by several disks has one [`SliceAllocator`], owned by one reactor's
//!   `QosTable` and run by its [`AllocatorPoller`]. Each slice every disk sends its
//!   [`DemandReport`] and gets back its [`Grant`] through bounded lock-free channels (no
//!   allocation per message); a late message costs one slice of accuracy, never a limit.
//! - The control plane changes limits, weights, devices by sending the owner reactor a message
//!   ([`super::manager`]); a change applies when the message runs, so within one slice.
//!
//! Channels opened on another reactor than the bdev's owner are not metered (documented in
//! docs/qos.md): every hostplane path that does IO opens its channel on the owner.

use super::bdev::{IoKind, IoRequest};
use super::qos::{
    Clock, DemandReport, DeviceCapacity, DiskQos, DiskQosConfig, DiskQosStats, Grant, QosIo, QosOp,
    SliceAllocator, SliceTimer, NS_PER_SEC,
};
use super::reactor::{PollStatus, Poller, Reactor};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

impl QosIo for IoRequest {
    #[inline]
    fn qos_op(&self) -> QosOp {
        match self.kind {
            IoKind::Read => QosOp::Read,
            IoKind::Write => QosOp::Write,
            _ => QosOp::Other,
        }
    }
    #[inline]
    fn qos_bytes(&self) -> u64 {
        self.len
    }
}

/// The storage clock (TSC) in nanoseconds: a multiply and a shift, no division per IO.
#[derive(Clone, Copy, Debug)]
pub struct TscClock {
    /// Nanoseconds per tick, as a 32.32 fixed-point number.
    mult: u128,
}

impl TscClock {
    /// A clock on [`super::ticks`] at [`super::ticks_hz`].
    pub fn new() -> TscClock {
        let hz = u128::from(super::ticks_hz().max(1));
        TscClock {
            mult: (u128::from(NS_PER_SEC) << 32) / hz,
        }
    }

    /// Converts a tick count to nanoseconds.
    #[inline]
    pub fn ns(&self, ticks: u64) -> u64 {
        u64::try_from((u128::from(ticks) * self.mult) >> 32).unwrap_or(u64::MAX)
    }
}

impl Default for TscClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TscClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.ns(super::ticks())
    }
}

/// A queued IO and the channel slot it came from.
struct Metered {
    req: IoRequest,
    slot: u32,
}

impl QosIo for Metered {
    #[inline]
    fn qos_op(&self) -> QosOp {
        self.req.qos_op()
    }
    #[inline]
    fn qos_bytes(&self) -> u64 {
        self.req.len
    }
}

/// A disk's link to its device's allocator.
struct DeviceLink {
    slot: usize,
    reports: Sender<(usize, DemandReport)>,
    grants: Receiver<Grant>,
}

/// One bdev's QoS on its owner reactor, shared by that reactor's channels to the bdev.
pub struct QosDisk {
    disk: DiskQos<Metered>,
    timer: SliceTimer,
    slice_ns: u64,
    clock: TscClock,
    /// Released IOs waiting for their channel's next poll, by channel slot.
    ready: Vec<Vec<IoRequest>>,
    live: Vec<bool>,
    scratch: Vec<Metered>,
    link: Option<DeviceLink>,
}

impl QosDisk {
    /// A disk with `config`, slices of `slice_ns`, not on a shared device.
    pub fn new(config: DiskQosConfig, slice_ns: u64) -> Result<QosDisk, String> {
        let clock = TscClock::new();
        let now = clock.now_ns();
        let grant = Grant {
            slice_ns,
            ..Grant::UNLIMITED
        };
        Ok(QosDisk {
            disk: DiskQos::new(config, grant, now).map_err(|e| e.to_string())?,
            timer: SliceTimer::new(slice_ns, now),
            slice_ns,
            clock,
            ready: Vec::new(),
            live: Vec::new(),
            scratch: Vec::with_capacity(64),
            link: None,
        })
    }

    /// A channel opens: its slot.
    fn attach(&mut self) -> u32 {
        let slot = self.live.iter().position(|l| !l).unwrap_or_else(|| {
            self.live.push(false);
            self.ready.push(Vec::new());
            self.live.len() - 1
        });
        self.live[slot] = true;
        slot as u32
    }

    /// A channel closes: hands back its queued and released-but-unsubmitted IOs (the channel
    /// fails them); other channels' IOs keep their order.
    fn detach(&mut self, slot: u32) -> Vec<IoRequest> {
        let s = slot as usize;
        let mut mine: Vec<IoRequest> = self
            .ready
            .get_mut(s)
            .map(std::mem::take)
            .unwrap_or_default();
        if let Some(l) = self.live.get_mut(s) {
            *l = false;
        }
        if self.disk.queued_ios() > 0 {
            let now = self.clock.now_ns();
            let queued: Vec<Metered> = self.disk.drain().collect();
            for m in queued {
                if m.slot == slot {
                    mine.push(m.req);
                } else if let super::qos::Admission::Proceed(m) = self.disk.submit(m, now) {
                    self.deliver(m);
                }
            }
        }
        mine
    }

    fn deliver(&mut self, m: Metered) {
        match self.ready.get_mut(m.slot as usize) {
            Some(v) if self.live[m.slot as usize] => v.push(m.req),
            // Its channel is gone: dropping the request fails it (Aborted).
            _ => drop(m),
        }
    }

    /// Offers an IO from channel `slot` at tick `tick`: `Some` = submit it now.
    #[inline]
    fn submit(&mut self, req: IoRequest, slot: u32, tick: u64) -> Option<IoRequest> {
        let now = self.clock.ns(tick);
        match self.disk.submit(Metered { req, slot }, now) {
            super::qos::Admission::Proceed(m) => Some(m.req),
            super::qos::Admission::Queued => None,
        }
    }

    /// Slice bookkeeping and releases; then moves channel `slot`'s released IOs into `out`.
    #[inline]
    fn release(&mut self, slot: u32, tick: u64, out: &mut Vec<IoRequest>) {
        let now = self.clock.ns(tick);
        self.service(now);
        if let Some(v) = self.ready.get_mut(slot as usize) {
            if !v.is_empty() {
                std::mem::swap(v, out);
            }
        }
    }

    fn service(&mut self, now: u64) {
        if let Some(link) = &self.link {
            // The newest grant wins.
            let mut g = None;
            while let Ok(x) = link.grants.try_recv() {
                g = Some(x);
            }
            if let Some(g) = g {
                self.disk.apply_grant(g, now);
            }
        }
        if self.timer.due(now) {
            let report = self.disk.close_slice(now);
            if let Some(link) = &self.link {
                // Full means the allocator is behind: it still has an older report.
                let _ = link.reports.try_send((link.slot, report));
            }
        }
        if self.disk.queued_ios() > 0 && self.disk.poll(now, &mut self.scratch) > 0 {
            let mut released = std::mem::take(&mut self.scratch);
            for m in released.drain(..) {
                self.deliver(m);
            }
            self.scratch = released;
        }
    }

    /// Changes limits, weight and reservation (limits apply at once).
    pub fn set_config(&mut self, config: DiskQosConfig) -> Result<(), String> {
        let now = self.clock.now_ns();
        self.disk.set_config(config, now).map_err(|e| e.to_string())
    }

    /// Joins a device (or leaves it with `None`): grants come from its allocator from now on.
    fn set_link(&mut self, link: Option<DeviceLink>, device: DeviceCapacity, slice_ns: u64) {
        let now = self.clock.now_ns();
        let grant = Grant {
            device,
            slice_ns,
            share: None,
        };
        self.disk.apply_grant(grant, now);
        self.link = link;
        if slice_ns != self.slice_ns {
            self.slice_ns = slice_ns;
            self.timer.set_slice(slice_ns, now);
        }
    }

    /// Counters and estimates.
    pub fn stats(&self) -> DiskQosStats {
        self.disk.stats()
    }

    /// The current configuration.
    pub fn config(&self) -> DiskQosConfig {
        *self.disk.config()
    }
}

/// The QoS side of one IO channel (on the bdev's owner reactor).
pub struct QosGate {
    disk: Rc<RefCell<QosDisk>>,
    slot: u32,
}

impl QosGate {
    /// See [`QosDisk::submit`].
    #[inline]
    pub fn submit(&self, req: IoRequest, tick: u64) -> Option<IoRequest> {
        self.disk.borrow_mut().submit(req, self.slot, tick)
    }

    /// See [`QosDisk::release`].
    #[inline]
    pub fn release(&self, tick: u64, out: &mut Vec<IoRequest>) {
        self.disk.borrow_mut().release(self.slot, tick, out)
    }

    /// The channel closes: its queued IOs, to be failed.
    pub fn close(&self) -> Vec<IoRequest> {
        self.disk.borrow_mut().detach(self.slot)
    }
}

/// A device's allocator, on the reactor that owns it.
struct DeviceAlloc {
    alloc: SliceAllocator,
    timer: SliceTimer,
    reports_rx: Receiver<(usize, DemandReport)>,
    reports_tx: Sender<(usize, DemandReport)>,
    grants: Vec<Option<Sender<Grant>>>,
}

/// Queue length of the report and grant channels (a few slices of slack).
const LINK_DEPTH: usize = 64;

/// A reactor's QoS state: the disks it owns and the device allocators it runs.
#[derive(Default)]
pub struct QosTable {
    disks: HashMap<u64, Rc<RefCell<QosDisk>>>,
    devices: HashMap<String, DeviceAlloc>,
    poller: bool,
    clock: Option<TscClock>,
}

impl QosTable {
    /// The disk of bdev `id`, if this reactor owns it.
    pub fn disk(&self, id: u64) -> Option<&Rc<RefCell<QosDisk>>> {
        self.disks.get(&id)
    }

    fn clock(&mut self) -> TscClock {
        *self.clock.get_or_insert_with(TscClock::new)
    }
}

/// Opens the QoS side of a channel to bdev `id` on reactor `r` (`None`: not metered here).
pub fn attach(r: &mut Reactor, id: u64) -> Option<QosGate> {
    let disk = r.local::<QosTable>().disks.get(&id)?.clone();
    let slot = disk.borrow_mut().attach();
    Some(QosGate { disk, slot })
}

/// Installs bdev `id`'s disk on this reactor (the owner). Runs on the reactor.
pub fn install(r: &mut Reactor, id: u64, disk: QosDisk) {
    r.local::<QosTable>()
        .disks
        .insert(id, Rc::new(RefCell::new(disk)));
}

/// Removes bdev `id`'s disk; its queued IOs stay with the channels that still hold it (a bdev is
/// only deleted with no channel open).
pub fn uninstall(r: &mut Reactor, id: u64) -> bool {
    r.local::<QosTable>().disks.remove(&id).is_some()
}

/// Runs `f` on bdev `id`'s disk.
pub fn with_disk<R>(r: &mut Reactor, id: u64, f: impl FnOnce(&mut QosDisk) -> R) -> Option<R> {
    let d = r.local::<QosTable>().disks.get(&id)?.clone();
    let mut d = d.borrow_mut();
    Some(f(&mut d))
}

/// What a disk needs to join a device (made on the allocator's reactor, installed on the disk's).
pub struct DeviceTicket {
    slot: usize,
    reports: Sender<(usize, DemandReport)>,
    grants: Receiver<Grant>,
    capacity: DeviceCapacity,
    slice_ns: u64,
}

/// Creates or updates device `name`'s allocator on this reactor. Runs on the reactor.
pub fn set_device(
    r: &mut Reactor,
    name: &str,
    capacity: DeviceCapacity,
    slice_ns: u64,
) -> Result<(), String> {
    let clock = r.local::<QosTable>().clock();
    let now = clock.now_ns();
    let t = r.local::<QosTable>();
    match t.devices.get_mut(name) {
        Some(d) => {
            d.alloc.set_capacity(capacity);
            if d.alloc.slice_ns() != slice_ns {
                d.alloc.set_slice(slice_ns).map_err(|e| e.to_string())?;
                d.timer.set_slice(slice_ns, now);
            }
        }
        None => {
            let (reports_tx, reports_rx) = crossbeam_channel::bounded(LINK_DEPTH * 16);
            t.devices.insert(
                name.to_string(),
                DeviceAlloc {
                    alloc: SliceAllocator::new(capacity, slice_ns).map_err(|e| e.to_string())?,
                    timer: SliceTimer::new(slice_ns, now),
                    reports_rx,
                    reports_tx,
                    grants: Vec::new(),
                },
            );
        }
    }
    if !t.poller {
        t.poller = true;
        r.register(Box::new(AllocatorPoller { clock }));
    }
    Ok(())
}

/// Removes device `name`'s allocator (its disks must have left). Runs on the reactor.
pub fn remove_device(r: &mut Reactor, name: &str) {
    r.local::<QosTable>().devices.remove(name);
}

/// Registers a disk with device `name`'s allocator. Runs on the allocator's reactor.
pub fn join_device(r: &mut Reactor, name: &str) -> Result<DeviceTicket, String> {
    let d = r
        .local::<QosTable>()
        .devices
        .get_mut(name)
        .ok_or_else(|| format!("no QoS device {name:?}"))?;
    let (gtx, grx) = crossbeam_channel::bounded(LINK_DEPTH);
    let slot = d
        .grants
        .iter()
        .position(Option::is_none)
        .unwrap_or_else(|| {
            d.grants.push(None);
            d.grants.len() - 1
        });
    d.grants[slot] = Some(gtx);
    Ok(DeviceTicket {
        slot,
        reports: d.reports_tx.clone(),
        grants: grx,
        capacity: d.alloc.capacity(),
        slice_ns: d.alloc.slice_ns(),
    })
}

/// Unregisters slot `slot` from device `name`'s allocator. Runs on the allocator's reactor.
pub fn leave_device(r: &mut Reactor, name: &str, slot: usize) {
    if let Some(d) = r.local::<QosTable>().devices.get_mut(name) {
        d.alloc.forget(slot);
        if let Some(g) = d.grants.get_mut(slot) {
            *g = None;
        }
    }
}

/// Connects bdev `id`'s disk to a device (`Some(ticket)`) or disconnects it (`None`, back to
/// its own limits only, slices of `slice_ns`). Runs on the disk's reactor. Returns the slot it
/// left, if it was on a device.
pub fn link_disk(
    r: &mut Reactor,
    id: u64,
    ticket: Option<DeviceTicket>,
    slice_ns: u64,
) -> Option<Option<usize>> {
    with_disk(r, id, |d| {
        let old = d.link.as_ref().map(|l| l.slot);
        match ticket {
            Some(t) => d.set_link(
                Some(DeviceLink {
                    slot: t.slot,
                    reports: t.reports,
                    grants: t.grants,
                }),
                t.capacity,
                t.slice_ns,
            ),
            None => d.set_link(None, DeviceCapacity::UNLIMITED, slice_ns),
        }
        old
    })
}

impl DeviceTicket {
    /// The allocator slot.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// Runs every device allocator of its reactor once per slice.
struct AllocatorPoller {
    clock: TscClock,
}

impl Poller for AllocatorPoller {
    fn poll(&mut self, r: &mut Reactor) -> PollStatus {
        let now = self.clock.now_ns();
        let mut work = 0;
        for d in r.local::<QosTable>().devices.values_mut() {
            if !d.timer.due(now) {
                continue;
            }
            while let Ok((slot, rep)) = d.reports_rx.try_recv() {
                if d.grants.get(slot).is_some_and(Option::is_some) {
                    d.alloc.report(slot, rep);
                }
            }
            for &(slot, g) in d.alloc.allocate() {
                if let Some(Some(tx)) = d.grants.get(slot) {
                    if let Err(TrySendError::Full(_)) = tx.try_send(g) {
                        // The disk is not polling: it will take the newest grant when it does.
                    }
                }
            }
            work += 1;
        }
        PollStatus::from_count(work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_clock_tracks_real_time() {
        let c = TscClock::new();
        let t0 = c.now_ns();
        let i = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let dt = c.now_ns() - t0;
        let real = i.elapsed().as_nanos() as f64;
        assert!((dt as f64 / real - 1.0).abs() < 0.05, "{dt} vs {real}");
    }
}
