//! [`DeviceQos`]: every disk of one device plus its allocator, driven by one owner.
//!
//! This is the single-reactor arrangement (and the simulation harness): the messages of the
//! multi-reactor arrangement ([`DemandReport`] up, [`Grant`] down) become function calls, in the
//! same order. The reactor calls [`DeviceQos::submit`] per request and [`DeviceQos::poll`] once
//! per loop iteration; `poll` ends the slice when its timer fires.

use super::alloc::{DemandReport, Grant, InvalidSlice, SliceAllocator};
use super::clock::{Clock, SliceTimer};
use super::disk::{Admission, ConfigError, DiskQos, DiskQosConfig, DiskQosStats, QosIo};
use super::limits::DeviceCapacity;

/// A disk's index within its [`DeviceQos`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u32);

/// Errors of [`DeviceQos`] operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    /// No disk with this id.
    #[error("no QoS disk {0}")]
    UnknownDisk(u32),
    /// Refused disk configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Refused slice length.
    #[error(transparent)]
    Slice(#[from] InvalidSlice),
}

/// The disks of one device and their allocator, owned by one thread, reading time from `C`.
#[derive(Debug)]
pub struct DeviceQos<T, C> {
    clock: C,
    allocator: SliceAllocator,
    timer: SliceTimer,
    disks: Vec<Option<DiskQos<T>>>,
    last_reports: Vec<DemandReport>,
    /// Reused by `poll` so the steady state allocates nothing.
    ready: Vec<T>,
}

impl<T: QosIo, C: Clock> DeviceQos<T, C> {
    /// A device of `capacity` ([`DeviceCapacity::UNLIMITED`] = only per-disk limits), slices of
    /// `slice_ns`.
    pub fn new(clock: C, capacity: DeviceCapacity, slice_ns: u64) -> Result<Self, QosError> {
        let allocator = SliceAllocator::new(capacity, slice_ns)?;
        let now = clock.now_ns();
        Ok(DeviceQos {
            clock,
            allocator,
            timer: SliceTimer::new(slice_ns, now),
            disks: Vec::new(),
            last_reports: Vec::new(),
            ready: Vec::new(),
        })
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Adds a disk; it gets a grant at once (so an uncontended device serves it immediately).
    pub fn add_disk(&mut self, config: DiskQosConfig) -> Result<DiskId, QosError> {
        let now = self.clock.now_ns();
        // Charged nothing until the allocation below gives it its share (a fresh, full bucket).
        let base = Grant {
            device: self.allocator.capacity(),
            slice_ns: self.allocator.slice_ns(),
            share: None,
        };
        let mut disk = DiskQos::new(config, base, now)?;
        let slot = self
            .disks
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.disks.len());
        self.allocator.report(slot, disk.close_slice(now));
        if slot == self.disks.len() {
            self.disks.push(None);
        }
        self.disks[slot] = Some(disk);
        self.publish(now);
        Ok(DiskId(slot as u32))
    }

    /// Removes a disk, handing back the IOs still queued on it (the caller completes them).
    pub fn remove_disk(&mut self, id: DiskId) -> Result<Vec<T>, QosError> {
        let mut disk = self
            .disks
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(QosError::UnknownDisk(id.0))?;
        self.allocator.forget(id.0 as usize);
        Ok(disk.drain().collect())
    }

    fn disk_mut(&mut self, id: DiskId) -> Result<&mut DiskQos<T>, QosError> {
        self.disks
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(QosError::UnknownDisk(id.0))
    }

    /// A disk's state.
    pub fn disk(&self, id: DiskId) -> Option<&DiskQos<T>> {
        self.disks.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// A disk's counters and estimates.
    pub fn stats(&self, id: DiskId) -> Result<DiskQosStats, QosError> {
        self.disk(id)
            .map(DiskQos::stats)
            .ok_or(QosError::UnknownDisk(id.0))
    }

    /// Changes a disk's limits, weight and reservation (limits at once, the rest from the next
    /// slice on).
    pub fn set_config(&mut self, id: DiskId, config: DiskQosConfig) -> Result<(), QosError> {
        let now = self.clock.now_ns();
        Ok(self.disk_mut(id)?.set_config(config, now)?)
    }

    /// Changes the device capacity (from the next slice on).
    pub fn set_capacity(&mut self, capacity: DeviceCapacity) {
        self.allocator.set_capacity(capacity);
    }

    /// Changes the slice length (from now on).
    pub fn set_slice(&mut self, slice_ns: u64) -> Result<(), QosError> {
        self.allocator.set_slice(slice_ns)?;
        self.timer.set_slice(slice_ns, self.clock.now_ns());
        Ok(())
    }

    /// Offers an IO to disk `id` (see [`DiskQos::submit`]).
    pub fn submit(&mut self, id: DiskId, io: T) -> Result<Admission<T>, QosError> {
        let now = self.clock.now_ns();
        Ok(self.disk_mut(id)?.submit(io, now))
    }

    /// Ends the slice if it is due, then releases what every disk's buckets allow, appending
    /// `(disk, io)` to `out`. Returns how many were released.
    pub fn poll(&mut self, out: &mut Vec<(DiskId, T)>) -> usize {
        let now = self.clock.now_ns();
        if self.timer.due(now) {
            self.end_slice(now);
        }
        let mut n = 0;
        for (i, d) in self.disks.iter_mut().enumerate() {
            if let Some(d) = d {
                if d.queued_ios() > 0 {
                    n += d.poll(now, &mut self.ready);
                    out.extend(self.ready.drain(..).map(|io| (DiskId(i as u32), io)));
                }
            }
        }
        n
    }

    /// The reports of the last slice, by disk slot (for inspection and tests).
    pub fn last_reports(&self) -> &[DemandReport] {
        &self.last_reports
    }

    /// Ends the slice: every disk reports, the allocator computes, every disk gets its grant.
    fn end_slice(&mut self, now: u64) {
        self.last_reports.clear();
        for (i, d) in self.disks.iter_mut().enumerate() {
            let r = d.as_mut().map(|d| d.close_slice(now)).unwrap_or_default();
            if d.is_some() {
                self.allocator.report(i, r);
            }
            self.last_reports.push(r);
        }
        self.publish(now);
    }

    fn publish(&mut self, now: u64) {
        for &(i, g) in self.allocator.allocate() {
            if let Some(Some(d)) = self.disks.get_mut(i) {
                d.apply_grant(g, now);
            }
        }
    }
}
