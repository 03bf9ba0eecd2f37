//! The vhost-user back-end state machine for one connection: message handling and ring
//! processing for a virtio-blk device.
//!
//! All protocol state lives in [`ConnState`], plain data that hostplane owns (negotiated
//! features, memory table with its fds, vrings with indices/addresses/eventfds, the inflight
//! region with its memfd, config space), so a handover can pass it to a new process.
//!
//! Every request that expects a reply gets one, whatever happens (QEMU blocks forever
//! otherwise): GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG, GET_INFLIGHT_FD
//! and GET_VRING_BASE never fail without a reply, and with REPLY_ACK every NEED_REPLY request is
//! acked with 0 (done) or 1 (refused).

use super::blk::{self, BlkGeometry, BlkStatus, BlockTarget, CompletionQueue, IoToken, Parsed};
use super::memory::{self, GuestMemory, MappedRegion, MemRegionInfo, SharedMapping, MAX_REGIONS};
use super::msg::{self, proto, req, Body, Message, F_PROTOCOL_FEATURES};
use super::virtq::{inflight_queue_stride, InflightQueue, Seg, Vring, MAX_QUEUE_SIZE};
use log::{debug, info, warn};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Protocol features we offer.
pub const PROTOCOL_FEATURES: u64 =
    proto::MQ | proto::REPLY_ACK | proto::CONFIG | proto::INFLIGHT_SHMFD;

/// Largest config-space access we answer (beyond [`blk::CONFIG_LEN`] it reads zeros).
pub const MAX_CONFIG_ACCESS: u32 = 256;

/// The inflight region in use (created by GET_INFLIGHT_FD or received with SET_INFLIGHT_FD).
#[derive(Debug)]
pub struct InflightState {
    /// Its memfd (kept for a handover and for QEMU's reconnect).
    pub fd: OwnedFd,
    /// Bytes mapped.
    pub mmap_size: u64,
    /// Offset in the fd.
    pub mmap_offset: u64,
    /// Queues described.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Our mapping.
    pub map: Arc<SharedMapping>,
}

/// All vhost-user state of one connection.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Virtio features acked by SET_FEATURES.
    pub features: u64,
    /// Protocol features acked by SET_PROTOCOL_FEATURES.
    pub protocol_features: u64,
    /// SET_OWNER seen.
    pub owner: bool,
    /// The current memory table.
    pub mem: Option<Arc<GuestMemory>>,
    /// One per queue.
    pub vrings: Vec<Vring>,
    /// The inflight region.
    pub inflight: Option<InflightState>,
    /// A GET_INFLIGHT_FD region not (yet) confirmed by SET_INFLIGHT_FD.
    pub inflight_offered: Option<InflightState>,
    /// The writeback byte of config space.
    pub writeback: u8,
    /// Why the device stopped processing its rings (NEEDS_RESET), if it did.
    pub broken: Option<String>,
}

/// What handling a message produced.
#[derive(Debug)]
pub enum Outcome {
    /// Send this reply body (a request with a reply of its own).
    Reply(Vec<u8>),
    /// Send this reply body with one fd.
    ReplyFd(Vec<u8>, RawFd),
    /// A request without a reply of its own: ack it if asked (true = done).
    Ack(bool),
    /// GET_VRING_BASE on a ring with requests in flight: reply once they drain.
    DrainThenReply(usize),
}

/// One connection's back-end.
pub struct Backend {
    /// The device's shape.
    pub geo: BlkGeometry,
    /// Protocol state.
    pub state: ConnState,
    /// Connection generation (tags requests).
    pub conn_gen: u64,
    /// Requests of earlier ring incarnations still at the target.
    pub stale: usize,
    /// Requests resubmitted from the inflight region (reconnect recovery).
    pub resubmitted: u64,
    name: String,
    segs: Vec<Seg>,
    done: Vec<Vec<(u16, u32)>>,
}

impl Backend {
    /// A fresh back-end for a new connection.
    pub fn new(name: &str, geo: BlkGeometry, conn_gen: u64) -> Backend {
        let n = usize::from(geo.num_queues);
        Backend {
            state: ConnState {
                vrings: (0..n).map(|_| Vring::default()).collect(),
                ..ConnState::default()
            },
            geo,
            conn_gen,
            stale: 0,
            resubmitted: 0,
            name: name.to_string(),
            segs: Vec::with_capacity(256),
            done: vec![Vec::new(); n],
        }
    }

    /// Features we offer on GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        self.geo.features() | F_PROTOCOL_FEATURES
    }

    /// Whether a NEED_REPLY request must be acked.
    pub fn reply_ack(&self) -> bool {
        self.state.protocol_features & proto::REPLY_ACK != 0
    }

    /// Requests fetched and not yet published, over all rings.
    pub fn outstanding(&self) -> usize {
        self.state
            .vrings
            .iter()
            .map(|v| v.state.outstanding)
            .sum::<usize>()
            + self.stale
    }

    /// Handles one message. Never panics on input; replies are left to the caller.
    pub fn handle(&mut self, m: Message) -> Outcome {
        let b = Body(&m.body);
        let r = m.hdr.request;
        match r {
            req::GET_FEATURES => Outcome::Reply(self.offered_features().to_ne_bytes().to_vec()),
            req::SET_FEATURES => {
                let Some(f) = b.u64(0) else {
                    return Outcome::Ack(false);
                };
                self.state.features = f & self.offered_features();
                let ev = self.state.features & blk::feat::RING_EVENT_IDX != 0;
                for v in &mut self.state.vrings {
                    v.event_idx = ev;
                }
                Outcome::Ack(f & !self.offered_features() == 0)
            }
            req::GET_PROTOCOL_FEATURES => Outcome::Reply(PROTOCOL_FEATURES.to_ne_bytes().to_vec()),
            req::SET_PROTOCOL_FEATURES => {
                let Some(f) = b.u64(0) else {
                    return Outcome::Ack(false);
                };
                self.state.protocol_features = f & PROTOCOL_FEATURES;
                Outcome::Ack(true)
            }
            req::SET_OWNER => {
                self.state.owner = true;
                Outcome::Ack(true)
            }
            req::RESET_OWNER => {
                self.reset_rings();
                self.state.features = 0;
                self.state.owner = false;
                Outcome::Ack(true)
            }
            req::GET_QUEUE_NUM => {
                Outcome::Reply(u64::from(self.geo.num_queues).to_ne_bytes().to_vec())
            }
            req::SET_MEM_TABLE => Outcome::Ack(self.set_mem_table(&b, m.fds)),
            req::SET_VRING_NUM => Outcome::Ack(self.set_vring_num(&b)),
            req::SET_VRING_ADDR => Outcome::Ack(self.set_vring_addr(&b)),
            req::SET_VRING_BASE => {
                let ok = match (self.vring_index(b.u32(0)), b.u32(4)) {
                    (Some(i), Some(n)) if !self.state.vrings[i].state.started => {
                        self.state.vrings[i].state.last_avail_idx = n as u16;
                        true
                    }
                    _ => false,
                };
                Outcome::Ack(ok)
            }
            req::GET_VRING_BASE => match self.vring_index(b.u32(0)) {
                Some(i) => {
                    let v = &mut self.state.vrings[i];
                    v.state.started = false;
                    if v.state.outstanding > 0 && v.map.is_some() && self.state.broken.is_none() {
                        Outcome::DrainThenReply(i)
                    } else {
                        Outcome::Reply(self.stop_ring(i))
                    }
                }
                None => {
                    warn!("{}: GET_VRING_BASE for a bad index", self.name);
                    let mut body = b.u32(0).unwrap_or(0).to_ne_bytes().to_vec();
                    body.extend_from_slice(&0u32.to_ne_bytes());
                    Outcome::Reply(body)
                }
            },
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                Outcome::Ack(self.set_vring_fd(r, &b, m.fds))
            }
            req::SET_VRING_ENABLE => {
                let ok = match (self.vring_index(b.u32(0)), b.u32(4)) {
                    (Some(i), Some(n)) => {
                        self.state.vrings[i].state.enabled = n != 0;
                        true
                    }
                    _ => false,
                };
                Outcome::Ack(ok)
            }
            req::GET_CONFIG => Outcome::Reply(self.get_config(&b)),
            req::SET_CONFIG => Outcome::Ack(self.set_config(&b)),
            req::GET_INFLIGHT_FD => self.get_inflight_fd(&b),
            req::SET_INFLIGHT_FD => Outcome::Ack(self.set_inflight_fd(&b, m.fds)),
            _ => {
                warn!(
                    "{}: unsupported vhost-user request {} ({} bytes)",
                    self.name,
                    r,
                    m.body.len()
                );
                Outcome::Ack(false)
            }
        }
    }

    fn vring_index(&self, i: Option<u32>) -> Option<usize> {
        let i = i? as usize;
        (i < self.state.vrings.len()).then_some(i)
    }

    /// Stops ring `i` and returns the GET_VRING_BASE reply body.
    pub fn stop_ring(&mut self, i: usize) -> Vec<u8> {
        let v = &mut self.state.vrings[i];
        // Requests still out (drain timed out) belong to the old incarnation now.
        self.stale += v.state.outstanding;
        v.state.outstanding = 0;
        let base = v.stop();
        let mut body = (i as u32).to_ne_bytes().to_vec();
        body.extend_from_slice(&u32::from(base).to_ne_bytes());
        body
    }

    fn reset_rings(&mut self) {
        for v in &mut self.state.vrings {
            self.stale += v.state.outstanding;
            v.state.outstanding = 0;
            v.stop();
            v.state.enabled = false;
        }
        self.state.broken = None;
    }

    fn set_mem_table(&mut self, b: &Body, fds: Vec<OwnedFd>) -> bool {
        let Some(n) = b.u32(0).map(|n| n as usize) else {
            return false;
        };
        if n == 0 || n > MAX_REGIONS || fds.len() != n || b.0.len() < 8 + 32 * n {
            warn!(
                "{}: SET_MEM_TABLE with {n} regions and {} fds refused",
                self.name,
                fds.len()
            );
            return false;
        }
        let mut regions = Vec::with_capacity(n);
        for (k, fd) in fds.into_iter().enumerate() {
            let o = 8 + 32 * k;
            let info = MemRegionInfo {
                guest_phys_addr: b.u64(o).unwrap_or(0),
                size: b.u64(o + 8).unwrap_or(0),
                user_addr: b.u64(o + 16).unwrap_or(0),
                mmap_offset: b.u64(o + 24).unwrap_or(0),
                fd,
            };
            match MappedRegion::map(info) {
                Ok(r) => regions.push(r),
                Err(e) => {
                    warn!("{}: memory region {k}: {e}", self.name);
                    return false;
                }
            }
        }
        let mem = GuestMemory::new(regions);
        // Running rings follow the new table (memory hotplug); the old mapping stays alive
        // until the requests that point into it complete.
        let mut ok = true;
        for (i, v) in self.state.vrings.iter_mut().enumerate() {
            if v.map.is_some() && v.remap(&mem).is_err() {
                warn!("{}: ring {i} not inside the new memory table", self.name);
                self.state.broken = Some(format!("ring {i} outside new memory table"));
                ok = false;
            }
        }
        self.state.mem = Some(mem);
        ok
    }

    fn set_vring_num(&mut self, b: &Body) -> bool {
        match (self.vring_index(b.u32(0)), b.u32(4)) {
            (Some(i), Some(n))
                if n > 0
                    && n <= u32::from(MAX_QUEUE_SIZE)
                    && n.is_power_of_two()
                    && !self.state.vrings[i].state.started =>
            {
                self.state.vrings[i].state.size = n as u16;
                true
            }
            _ => false,
        }
    }

    fn set_vring_addr(&mut self, b: &Body) -> bool {
        let Some(i) = self.vring_index(b.u32(0)) else {
            return false;
        };
        let (Some(flags), Some(desc), Some(used), Some(avail)) =
            (b.u32(4), b.u64(8), b.u64(16), b.u64(24))
        else {
            return false;
        };
        let v = &mut self.state.vrings[i];
        v.state.addr_flags = flags;
        v.state.desc_addr = desc;
        v.state.used_addr = used;
        v.state.avail_addr = avail;
        if v.state.started {
            if let Some(mem) = &self.state.mem {
                return v.remap(mem).is_ok();
            }
        }
        true
    }

    fn set_vring_fd(&mut self, r: u32, b: &Body, mut fds: Vec<OwnedFd>) -> bool {
        let Some(val) = b.u64(0) else {
            return false;
        };
        let Some(i) = self.vring_index(Some((val & 0xff) as u32)) else {
            return false;
        };
        let nofd = val & 0x100 != 0;
        let fd = if nofd {
            None
        } else if fds.len() == 1 {
            fds.pop()
        } else {
            warn!("{}: vring fd message with {} fds", self.name, fds.len());
            return false;
        };
        match r {
            req::SET_VRING_CALL => self.state.vrings[i].state.call = fd,
            req::SET_VRING_ERR => self.state.vrings[i].state.err = fd,
            _ => {
                self.state.vrings[i].state.kick = fd;
                return self.start_ring(i);
            }
        }
        true
    }

    /// Starts ring `i` (on its kick fd): map it, run inflight recovery.
    fn start_ring(&mut self, i: usize) -> bool {
        if self.state.vrings.iter().all(|v| !v.state.started) {
            self.state.broken = None;
        }
        let Some(mem) = self.state.mem.clone() else {
            warn!("{}: ring {i} kicked before SET_MEM_TABLE", self.name);
            return false;
        };
        let size = self.state.vrings[i].state.size;
        let inflight = self.state.inflight.as_ref().and_then(|inf| {
            if i >= usize::from(inf.num_queues) || size > inf.queue_size {
                warn!(
                    "{}: ring {i} (size {size}) not covered by the inflight region",
                    self.name
                );
                return None;
            }
            InflightQueue::new(inf.map.clone(), i, inf.queue_size)
        });
        let no_proto = self.state.features & F_PROTOCOL_FEATURES == 0;
        let v = &mut self.state.vrings[i];
        self.stale += v.state.outstanding;
        match v.start(&mem, inflight) {
            Ok(()) => {
                if no_proto {
                    v.state.enabled = true;
                }
                let st = &v.state;
                self.resubmitted += st.resubmit.len() as u64;
                info!(
                    "{}: ring {i} started: size {} avail {} used {} resubmit {}",
                    self.name,
                    st.size,
                    st.last_avail_idx,
                    st.used_idx,
                    st.resubmit.len()
                );
                true
            }
            Err(e) => {
                warn!("{}: ring {i}: {e}", self.name);
                false
            }
        }
    }

    fn get_config(&self, b: &Body) -> Vec<u8> {
        let (off, size, flags) = (b.u32(0), b.u32(4), b.u32(8));
        let mut out = Vec::with_capacity(12 + 64);
        match (off, size) {
            (Some(off), Some(size))
                if size > 0
                    && off
                        .checked_add(size)
                        .is_some_and(|e| e <= MAX_CONFIG_ACCESS) =>
            {
                let mut space = [0u8; MAX_CONFIG_ACCESS as usize];
                space[..blk::CONFIG_LEN]
                    .copy_from_slice(&self.geo.config_space(self.state.writeback));
                out.extend_from_slice(&off.to_ne_bytes());
                out.extend_from_slice(&size.to_ne_bytes());
                out.extend_from_slice(&flags.unwrap_or(0).to_ne_bytes());
                out.extend_from_slice(&space[off as usize..(off + size) as usize]);
            }
            _ => {
                // A zero-size reply tells the front-end the read failed (it still gets a reply).
                warn!("{}: GET_CONFIG {off:?}+{size:?} refused", self.name);
                out.extend_from_slice(&off.unwrap_or(0).to_ne_bytes());
                out.extend_from_slice(&0u32.to_ne_bytes());
                out.extend_from_slice(&flags.unwrap_or(0).to_ne_bytes());
            }
        }
        out
    }

    fn set_config(&mut self, b: &Body) -> bool {
        // Only the writeback byte (offset 32) is writable.
        match (b.u32(0), b.u32(4), b.0.get(12)) {
            (Some(32), Some(1), Some(&v)) => {
                self.state.writeback = v;
                true
            }
            (off, size, _) => {
                warn!("{}: SET_CONFIG {off:?}+{size:?} refused", self.name);
                false
            }
        }
    }

    fn get_inflight_fd(&mut self, b: &Body) -> Outcome {
        let (nq, qs) = (b.u16(16).unwrap_or(0), b.u16(18).unwrap_or(0));
        let reply = |size: u64| {
            let mut v = size.to_ne_bytes().to_vec();
            v.extend_from_slice(&0u64.to_ne_bytes());
            v.extend_from_slice(&nq.to_ne_bytes());
            v.extend_from_slice(&qs.to_ne_bytes());
            v.extend_from_slice(&[0u8; 4]);
            v
        };
        if nq == 0 || nq > self.geo.num_queues || qs == 0 || qs > MAX_QUEUE_SIZE {
            // mmap_size 0 without an fd: QEMU then runs without inflight tracking.
            warn!(
                "{}: GET_INFLIGHT_FD for {nq} queues of {qs} refused",
                self.name
            );
            return Outcome::Reply(reply(0));
        }
        let size = inflight_queue_stride(qs) * u64::from(nq);
        let made = memory::memfd("hostplane-inflight", size).and_then(|fd| {
            let map = SharedMapping::map(&fd, 0, size)?;
            Ok((fd, map))
        });
        match made {
            Ok((fd, map)) => {
                let raw = fd.as_raw_fd();
                debug!("{}: inflight region {size} bytes for {nq}x{qs}", self.name);
                self.state.inflight_offered = Some(InflightState {
                    fd,
                    mmap_size: size,
                    mmap_offset: 0,
                    num_queues: nq,
                    queue_size: qs,
                    map: Arc::new(map),
                });
                Outcome::ReplyFd(reply(size), raw)
            }
            Err(e) => {
                warn!("{}: inflight memfd: {e}", self.name);
                Outcome::Reply(reply(0))
            }
        }
    }

    fn set_inflight_fd(&mut self, b: &Body, mut fds: Vec<OwnedFd>) -> bool {
        let (Some(size), Some(off), Some(nq), Some(qs)) =
            (b.u64(0), b.u64(8), b.u16(16), b.u16(18))
        else {
            return false;
        };
        let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
            warn!("{}: SET_INFLIGHT_FD needs exactly one fd", self.name);
            return false;
        };
        if nq == 0
            || qs == 0
            || qs > MAX_QUEUE_SIZE
            || inflight_queue_stride(qs) * u64::from(nq) > size
        {
            warn!(
                "{}: SET_INFLIGHT_FD {size} bytes for {nq}x{qs} refused",
                self.name
            );
            return false;
        }
        match SharedMapping::map(&fd, off, size) {
            Ok(map) => {
                self.state.inflight_offered = None;
                self.state.inflight = Some(InflightState {
                    fd,
                    mmap_size: size,
                    mmap_offset: off,
                    num_queues: nq,
                    queue_size: qs,
                    map: Arc::new(map),
                });
                true
            }
            Err(e) => {
                warn!("{}: SET_INFLIGHT_FD map: {e}", self.name);
                false
            }
        }
    }

    /// Marks the device broken: no ring is processed until the front-end restarts them.
    fn break_device(&mut self, why: String) {
        warn!("{}: device needs reset: {why}", self.name);
        for v in &self.state.vrings {
            if let Some(fd) = &v.state.err {
                msg::signal_eventfd(fd);
            }
        }
        self.state.broken = Some(why);
    }

    /// Fetches and submits new requests from every ready ring (at most `budget` each).
    pub fn process_rings(
        &mut self,
        target: &mut dyn BlockTarget,
        sink: &CompletionQueue,
        budget: usize,
    ) -> usize {
        if self.state.broken.is_some() {
            return 0;
        }
        let mut work = 0;
        for qi in 0..self.state.vrings.len() {
            let mut inline: Vec<(u16, u32)> = Vec::new();
            for _ in 0..budget {
                let v = &mut self.state.vrings[qi];
                if !v.ready() {
                    break;
                }
                let head = match v.pop() {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        self.break_device(format!("queue {qi}: {e}"));
                        return work;
                    }
                };
                work += 1;
                let walked = v.walk(head, &mut self.segs);
                if let Err(e) = walked {
                    debug!("{}: queue {qi} head {head}: {e}", self.name);
                }
                let Some(mem) = v.map.as_ref().map(|m| m.mem.clone()) else {
                    break;
                };
                let token = IoToken {
                    conn: self.conn_gen,
                    queue: qi as u16,
                    ring_gen: v.state.generation,
                    head,
                    status: std::ptr::null_mut(),
                    written: 0,
                };
                match blk::parse_request(&self.segs, walked.is_ok(), &self.geo, &mem, token, sink) {
                    Parsed::Io(io) => target.submit(io),
                    Parsed::Done {
                        status,
                        st,
                        written,
                    } => {
                        // SAFETY: `status` is the last byte of a translated writable buffer in
                        // `mem`, which is alive here.
                        unsafe { std::ptr::write_volatile(status, st.byte()) };
                        inline.push((head, written + 1));
                    }
                    Parsed::NoStatus => {
                        // Never reaches the target: not outstanding (it stays marked inflight).
                        let st = &mut self.state.vrings[qi].state;
                        st.outstanding = st.outstanding.saturating_sub(1);
                        self.break_device(format!(
                            "queue {qi} head {head}: request without a usable status byte"
                        ));
                        return work;
                    }
                }
            }
            if !inline.is_empty() {
                let v = &mut self.state.vrings[qi];
                if v.publish(&inline) {
                    if let Some(fd) = &v.state.call {
                        msg::signal_eventfd(fd);
                    }
                }
            }
        }
        work
    }

    /// Publishes completions of this connection; returns how many were published.
    pub fn complete(&mut self, items: &mut Vec<(IoToken, BlkStatus, Arc<GuestMemory>)>) -> usize {
        let mut n = 0;
        for (t, st, _mem) in items.drain(..) {
            let q = usize::from(t.queue);
            let broken = self.state.broken.is_some();
            match self.state.vrings.get_mut(q) {
                Some(v) if v.map.is_some() && v.state.generation == t.ring_gen => {
                    if broken {
                        // The rings are not touched any more; the request stays marked in the
                        // inflight region.
                        v.state.outstanding = v.state.outstanding.saturating_sub(1);
                        continue;
                    }
                }
                _ => {
                    // An earlier incarnation: it stays marked in the inflight region and is
                    // resubmitted when the ring restarts.
                    self.stale = self.stale.saturating_sub(1);
                    continue;
                }
            }
            // SAFETY: t.status points into the mapping `_mem` keeps alive (translated writable
            // byte when the request was parsed).
            unsafe { std::ptr::write_volatile(t.status, st.byte()) };
            let len = if st == BlkStatus::Ok {
                t.written + 1
            } else {
                1
            };
            self.done[q].push((t.head, len));
            n += 1;
        }
        for q in 0..self.done.len() {
            if self.done[q].is_empty() {
                continue;
            }
            let v = &mut self.state.vrings[q];
            if v.publish(&self.done[q]) {
                if let Some(fd) = &v.state.call {
                    msg::signal_eventfd(fd);
                }
            }
            self.done[q].clear();
        }
        n
    }
}
