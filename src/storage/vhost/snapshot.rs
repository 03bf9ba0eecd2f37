//! A controller's state as a handover passes it to a new process: [`ConnState`] as serialisable
//! plain data, with every fd (listening socket, connection, memory regions, kick/call/err
//! eventfds, inflight memfd) replaced by its index in the message's fd list.
//!
//! The old process takes a snapshot only when the controller is quiesced (paused, nothing at the
//! target, no message half read, no GET_VRING_BASE waiting), so the new process restarts each
//! started ring from the inflight region with nothing to resubmit: `used_idx + 0` is exactly
//! where the old one stopped. Host pointers are never passed; the new process maps the fds and
//! rebuilds them.

use super::backend::{Backend, ConnState, InflightState};
use super::blk::{self, BlkGeometry};
use super::memory::{GuestMemory, MappedRegion, MemRegionInfo, SharedMapping};
use super::virtq::{InflightQueue, Vring};
use crate::handover::fdpass::{FdIn, FdOut};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::Arc;

/// One controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerSnapshot {
    /// Controller name.
    pub name: String,
    /// Socket path (the listening socket itself is passed as an fd; the path is not re-bound).
    pub socket_path: std::path::PathBuf,
    /// Read-only.
    pub readonly: bool,
    /// Queues offered.
    pub num_queues: u16,
    /// Block size and capacity the guest negotiated (the new target must match).
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Fd index of the listening socket.
    pub listener: usize,
    /// Connection generation counter.
    pub conn_gen: u64,
    /// The live connection, if any.
    pub conn: Option<ConnSnapshot>,
}

/// One connection: [`ConnState`] as data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSnapshot {
    /// Fd index of the connected socket.
    pub stream: usize,
    /// Acked virtio features.
    pub features: u64,
    /// Acked protocol features.
    pub protocol_features: u64,
    /// SET_OWNER seen.
    pub owner: bool,
    /// Config-space writeback byte.
    pub writeback: u8,
    /// Why the device stopped, if it did.
    pub broken: Option<String>,
    /// Memory table.
    pub mem: Vec<RegionSnapshot>,
    /// Rings.
    pub vrings: Vec<VringSnapshot>,
    /// Inflight region in use.
    pub inflight: Option<InflightSnapshot>,
    /// Requests resubmitted so far (counter).
    pub resubmitted: u64,
}

/// One memory region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionSnapshot {
    /// Guest-physical address.
    pub guest_phys_addr: u64,
    /// Size.
    pub size: u64,
    /// QEMU's virtual address.
    pub user_addr: u64,
    /// Offset in the fd.
    pub mmap_offset: u64,
    /// Fd index.
    pub fd: usize,
}

/// One vring.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VringSnapshot {
    /// Queue size.
    pub size: u16,
    /// Descriptor table (QEMU address).
    pub desc_addr: u64,
    /// Available ring.
    pub avail_addr: u64,
    /// Used ring.
    pub used_addr: u64,
    /// SET_VRING_ADDR flags.
    pub addr_flags: u32,
    /// Next available index to fetch.
    pub last_avail_idx: u16,
    /// Used idx we published.
    pub used_idx: u16,
    /// Inflight fetch counter.
    pub inflight_counter: u64,
    /// Enabled.
    pub enabled: bool,
    /// Started.
    pub started: bool,
    /// Ring generation.
    pub generation: u64,
    /// Kick eventfd index.
    pub kick: Option<usize>,
    /// Call eventfd index.
    pub call: Option<usize>,
    /// Err eventfd index.
    pub err: Option<usize>,
}

/// The inflight region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InflightSnapshot {
    /// Memfd index.
    pub fd: usize,
    /// Bytes mapped.
    pub mmap_size: u64,
    /// Offset.
    pub mmap_offset: u64,
    /// Queues.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Requests are still at the target, or a message is half read.
    #[error("controller {0} is not quiesced")]
    Busy(String),
    /// The new target differs from what the guest negotiated.
    #[error("controller {name}: {what}")]
    Mismatch {
        /// Controller.
        name: String,
        /// What differs.
        what: String,
    },
    /// An fd could not be mapped or is missing.
    #[error("controller {name}: {err}")]
    Io {
        /// Controller.
        name: String,
        /// The error.
        err: io::Error,
    },
}

impl Backend {
    /// The connection state as data; `stream` is the connected socket's fd index.
    pub fn snapshot(&self, stream: usize, fds: &mut FdOut) -> ConnSnapshot {
        let st = &self.state;
        let mem = st
            .mem
            .as_ref()
            .map(|m| {
                m.regions()
                    .iter()
                    .map(|r| RegionSnapshot {
                        guest_phys_addr: r.info.guest_phys_addr,
                        size: r.info.size,
                        user_addr: r.info.user_addr,
                        mmap_offset: r.info.mmap_offset,
                        fd: fds.add(&r.info.fd),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let vrings = st
            .vrings
            .iter()
            .map(|v| {
                let s = &v.state;
                VringSnapshot {
                    size: s.size,
                    desc_addr: s.desc_addr,
                    avail_addr: s.avail_addr,
                    used_addr: s.used_addr,
                    addr_flags: s.addr_flags,
                    last_avail_idx: s.last_avail_idx,
                    used_idx: s.used_idx,
                    inflight_counter: s.inflight_counter,
                    enabled: s.enabled,
                    started: s.started,
                    generation: s.generation,
                    kick: s.kick.as_ref().map(|f| fds.add(f)),
                    call: s.call.as_ref().map(|f| fds.add(f)),
                    err: s.err.as_ref().map(|f| fds.add(f)),
                }
            })
            .collect();
        ConnSnapshot {
            stream,
            features: st.features,
            protocol_features: st.protocol_features,
            owner: st.owner,
            writeback: st.writeback,
            broken: st.broken.clone(),
            mem,
            vrings,
            inflight: st.inflight.as_ref().map(|i| InflightSnapshot {
                fd: fds.add(&i.fd),
                mmap_size: i.mmap_size,
                mmap_offset: i.mmap_offset,
                num_queues: i.num_queues,
                queue_size: i.queue_size,
            }),
            resubmitted: self.resubmitted,
        }
    }

    /// Rebuilds a live back-end from a snapshot: maps guest memory and the inflight region,
    /// restarts every started ring from the inflight region (resume at `used_idx` + inflight
    /// entries, resubmitting those). Never touches the socket.
    pub fn restore(
        name: &str,
        geo: BlkGeometry,
        conn_gen: u64,
        snap: &ConnSnapshot,
        fds: &mut FdIn,
    ) -> io::Result<Backend> {
        let mut b = Backend::new(name, geo, conn_gen);
        if snap.vrings.len() != b.state.vrings.len() {
            return Err(io::Error::other(format!(
                "{} rings in the snapshot, {} queues configured",
                snap.vrings.len(),
                b.state.vrings.len()
            )));
        }
        let mut regions = Vec::with_capacity(snap.mem.len());
        for r in &snap.mem {
            let info = MemRegionInfo {
                guest_phys_addr: r.guest_phys_addr,
                size: r.size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
                fd: fds.take(r.fd)?,
            };
            regions.push(MappedRegion::map(info).map_err(io::Error::other)?);
        }
        let mem: Option<Arc<GuestMemory>> =
            (!regions.is_empty()).then(|| GuestMemory::new(regions));
        let inflight = match &snap.inflight {
            Some(i) => {
                let fd = fds.take(i.fd)?;
                let map = SharedMapping::map(&fd, i.mmap_offset, i.mmap_size)?;
                Some(InflightState {
                    fd,
                    mmap_size: i.mmap_size,
                    mmap_offset: i.mmap_offset,
                    num_queues: i.num_queues,
                    queue_size: i.queue_size,
                    map: Arc::new(map),
                })
            }
            None => None,
        };
        let event_idx = snap.features & blk::feat::RING_EVENT_IDX != 0;
        let mut vrings = Vec::with_capacity(snap.vrings.len());
        for (i, vs) in snap.vrings.iter().enumerate() {
            let mut v = Vring {
                event_idx,
                ..Vring::default()
            };
            let s = &mut v.state;
            s.size = vs.size;
            s.desc_addr = vs.desc_addr;
            s.avail_addr = vs.avail_addr;
            s.used_addr = vs.used_addr;
            s.addr_flags = vs.addr_flags;
            s.last_avail_idx = vs.last_avail_idx;
            s.used_idx = vs.used_idx;
            s.inflight_counter = vs.inflight_counter;
            s.enabled = vs.enabled;
            s.generation = vs.generation;
            s.kick = vs.kick.map(|k| fds.take(k)).transpose()?;
            s.call = vs.call.map(|k| fds.take(k)).transpose()?;
            s.err = vs.err.map(|k| fds.take(k)).transpose()?;
            if vs.started {
                let Some(mem) = &mem else {
                    return Err(io::Error::other(format!("ring {i} started without memory")));
                };
                let inf = inflight.as_ref().and_then(|inf| {
                    (i < usize::from(inf.num_queues) && vs.size <= inf.queue_size)
                        .then(|| InflightQueue::new(inf.map.clone(), i, inf.queue_size))
                        .flatten()
                });
                v.start(mem, inf)
                    .map_err(|e| io::Error::other(format!("ring {i}: {e}")))?;
                b.resubmitted += v.state.resubmit.len() as u64;
                if v.state.last_avail_idx != vs.last_avail_idx {
                    log::warn!(
                        "{name}: ring {i} resumes at {} (old process stopped at {}): {} requests to resubmit",
                        v.state.last_avail_idx,
                        vs.last_avail_idx,
                        v.state.resubmit.len()
                    );
                }
            }
            vrings.push(v);
        }
        b.state = ConnState {
            features: snap.features,
            protocol_features: snap.protocol_features,
            owner: snap.owner,
            mem,
            vrings,
            inflight,
            inflight_offered: None,
            writeback: snap.writeback,
            broken: snap.broken.clone(),
        };
        b.resubmitted += snap.resubmitted;
        Ok(b)
    }
}
