//! Protocol tests: rust-vmm's vhost-user Frontend drives our back-end over a real Unix socket,
//! with memfd "guest memory" whose rings the test fills by hand. The controllers live on a
//! backend thread (they are single-threaded, like on a reactor) that polls them continuously.

use super::blk::{feat, req_type, MemTarget};
use super::controller::{VhostBlkController, VhostBlkControllerConfig};
use super::memory::memfd;
use super::virtq::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const QS: u16 = 32;
const MEM_SIZE: u64 = 4 << 20;
/// The "user address" the test frontend claims for its memory (any value: it only names it).
const UADDR: u64 = 0x7f00_0000_0000;
const BS: u32 = 512;
const BLOCKS: u64 = 2048;

// Guest-physical layout per queue q: desc at q*0x4000, avail +0x1000, used +0x2000.
fn desc_gpa(q: u16) -> u64 {
    u64::from(q) * 0x4000
}
fn avail_gpa(q: u16) -> u64 {
    desc_gpa(q) + 0x1000
}
fn used_gpa(q: u16) -> u64 {
    desc_gpa(q) + 0x2000
}
// Request slot k of queue q: header at 0x40000 + ..., status right after, data at 0x100000 + ...
fn hdr_gpa(q: u16, k: u16) -> u64 {
    0x40000 + u64::from(q) * 0x4000 + u64::from(k) * 0x100
}
fn data_gpa(q: u16, k: u16) -> u64 {
    0x100000 + u64::from(q) * 0x80000 + u64::from(k) * 0x2000
}

/// Polls `cond` every millisecond; fails the test after 5 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The 16-byte discard / write-zeroes segment.
fn range_segment(sector: u64, num: u32) -> Vec<u8> {
    let mut seg = sector.to_le_bytes().to_vec();
    seg.extend_from_slice(&num.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    seg
}

/// The test's view of guest memory.
struct Guest {
    fd: OwnedFd,
    base: *mut u8,
    avail_idx: Vec<u16>,
}

impl Guest {
    fn new(queues: u16) -> Guest {
        let fd = memfd("test-guest", MEM_SIZE).unwrap();
        // SAFETY: fresh shared mapping of a memfd of MEM_SIZE bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Guest {
            fd,
            base: p.cast(),
            avail_idx: vec![0; usize::from(queues)],
        }
    }
    fn write(&self, gpa: u64, b: &[u8]) {
        assert!(gpa + b.len() as u64 <= MEM_SIZE);
        // SAFETY: inside the mapping (asserted).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(gpa as usize), b.len()) }
    }
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa + len as u64 <= MEM_SIZE);
        let mut v = vec![0; len];
        // SAFETY: inside the mapping (asserted).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) }
        v
    }
    fn r16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(table + 16 * u64::from(i), &d);
    }
    fn push_avail(&mut self, q: u16, head: u16) {
        let idx = self.avail_idx[usize::from(q)];
        self.write(
            avail_gpa(q) + 4 + 2 * u64::from(idx % QS),
            &head.to_le_bytes(),
        );
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx[usize::from(q)] = idx.wrapping_add(1);
        self.write(avail_gpa(q) + 2, &idx.wrapping_add(1).to_le_bytes());
    }
    fn used_idx(&self, q: u16) -> u16 {
        self.r16(used_gpa(q) + 2)
    }
    fn used_elem(&self, q: u16, i: u16) -> (u32, u32) {
        let b = self.read(used_gpa(q) + 4 + 8 * u64::from(i % QS), 8);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
    /// A 3-descriptor request in slot k (descriptors 3k..3k+2): header, data, status.
    fn request(&mut self, q: u16, k: u16, rtype: u32, sector: u64, data_len: u32) -> u16 {
        let mut h = Vec::new();
        h.extend_from_slice(&rtype.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        let hg = hdr_gpa(q, k);
        self.write(hg, &h);
        self.write(hg + 16, &[0xff]);
        let t = desc_gpa(q);
        let d0 = 3 * k;
        let data_flags = if rtype == req_type::OUT || rtype == req_type::DISCARD {
            VRING_DESC_F_NEXT
        } else {
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
        };
        if data_len > 0 {
            self.desc(t, d0, hg, 16, VRING_DESC_F_NEXT, d0 + 1);
            self.desc(t, d0 + 1, data_gpa(q, k), data_len, data_flags, d0 + 2);
            self.desc(t, d0 + 2, hg + 16, 1, VRING_DESC_F_WRITE, 0);
        } else {
            self.desc(t, d0, hg, 16, VRING_DESC_F_NEXT, d0 + 2);
            self.desc(t, d0 + 2, hg + 16, 1, VRING_DESC_F_WRITE, 0);
        }
        self.push_avail(q, d0);
        d0
    }
    fn status(&self, q: u16, k: u16) -> u8 {
        self.read(hdr_gpa(q, k) + 16, 1)[0]
    }
    fn wait_used(&self, q: u16, n: u16) {
        wait_until(&format!("queue {q}: used idx {n}"), || {
            self.used_idx(q) == n
        });
    }
    /// Submits a request in slot k, waits until it is used, returns its status byte.
    fn io(&mut self, q: u16, k: u16, rtype: u32, sector: u64, data_len: u32) -> u8 {
        let n = self.used_idx(q).wrapping_add(1);
        self.request(q, k, rtype, sector, data_len);
        self.wait_used(q, n);
        self.status(q, k)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), MEM_SIZE as usize) };
    }
}

type Cmd = Box<dyn FnOnce(&mut Vec<(VhostBlkController, MemTarget)>) + Send>;

/// Controllers on their own polling thread.
struct BackendThread {
    tx: mpsc::Sender<Option<Cmd>>,
    join: Option<std::thread::JoinHandle<()>>,
}

struct CtrlSpec {
    path: PathBuf,
    readonly: bool,
    queues: u16,
}

impl BackendThread {
    fn start(specs: Vec<CtrlSpec>) -> BackendThread {
        let _ = env_logger::builder().is_test(true).try_init();
        let (tx, rx) = mpsc::channel::<Option<Cmd>>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::spawn(move || {
            let mut ctrls: Vec<(VhostBlkController, MemTarget)> = specs
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = MemTarget::new(BS, BLOCKS);
                    let c = VhostBlkController::new(
                        VhostBlkControllerConfig {
                            name: format!("disk{i}"),
                            socket_path: s.path,
                            readonly: s.readonly,
                            num_queues: s.queues,
                        },
                        Box::new(t.clone()),
                    )
                    .unwrap();
                    (c, t)
                })
                .collect();
            ready_tx.send(()).unwrap();
            loop {
                match rx.try_recv() {
                    Ok(Some(f)) => f(&mut ctrls),
                    Ok(None) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                let mut work = 0;
                for (c, _) in ctrls.iter_mut() {
                    work += c.poll();
                }
                if work == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        ready_rx.recv().unwrap();
        BackendThread {
            tx,
            join: Some(join),
        }
    }

    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vec<(VhostBlkController, MemTarget)>) -> R + Send + 'static,
    ) -> R {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Some(Box::new(move |c| {
                let _ = rtx.send(f(c));
            })))
            .unwrap();
        rrx.recv().unwrap()
    }
}

impl Drop for BackendThread {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn sock(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hp-vhost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

struct Conn {
    fe: Frontend,
    _kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

fn connect(path: &PathBuf, queues: u16) -> Frontend {
    let s = UnixStream::connect(path).unwrap();
    Frontend::from_stream(s, u64::from(queues))
}

/// Negotiates like QEMU does and starts `queues` rings. With `inflight`, uses GET/SET_INFLIGHT_FD
/// (or only SET with a given region, as after a reconnect).
fn setup(
    path: &PathBuf,
    g: &Guest,
    queues: u16,
    inflight: Option<Option<(&VhostUserInflight, &std::fs::File)>>,
    base: u16,
    event_idx: bool,
) -> (Conn, Option<(VhostUserInflight, std::fs::File)>) {
    let mut fe = connect(path, queues);
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    assert_ne!(f & (1 << 30), 0);
    for want in [
        feat::VERSION_1,
        feat::BLK_SIZE,
        feat::SEG_MAX,
        feat::FLUSH,
        feat::MQ,
    ] {
        assert_ne!(f & want, 0, "feature {want:#x} missing from {f:#x}");
    }
    let f = if event_idx {
        f
    } else {
        f & !feat::RING_EVENT_IDX
    };
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    assert!(pf.contains(want), "protocol features {pf:?}");
    fe.set_protocol_features(want).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), u64::from(queues));
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: UADDR,
        mmap_offset: 0,
        mmap_handle: g.fd.as_raw_fd(),
    }])
    .unwrap();
    let mut region = None;
    match inflight {
        Some(None) => {
            let (info, file) = fe
                .get_inflight_fd(&VhostUserInflight::new(0, 0, queues, QS))
                .unwrap();
            assert!(info.mmap_size >= u64::from(queues) * (16 + 16 * u64::from(QS)));
            fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
            region = Some((info, file));
        }
        Some(Some((info, file))) => fe.set_inflight_fd(info, file.as_raw_fd()).unwrap(),
        None => {}
    }
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for q in 0..queues {
        fe.set_vring_num(usize::from(q), QS).unwrap();
        fe.set_vring_base(usize::from(q), base).unwrap();
        fe.set_vring_addr(
            usize::from(q),
            &VringConfigData {
                queue_max_size: QS,
                queue_size: QS,
                flags: 0,
                desc_table_addr: UADDR + desc_gpa(q),
                used_ring_addr: UADDR + used_gpa(q),
                avail_ring_addr: UADDR + avail_gpa(q),
                log_addr: None,
            },
        )
        .unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(usize::from(q), &call).unwrap();
        fe.set_vring_kick(usize::from(q), &kick).unwrap();
        fe.set_vring_enable(usize::from(q), true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }
    (
        Conn {
            fe,
            _kicks: kicks,
            calls,
        },
        region,
    )
}

#[test]
fn negotiate_config_and_rw() {
    let p = sock("rw");
    let be = BackendThread::start(vec![CtrlSpec {
        path: p.clone(),
        readonly: false,
        queues: 2,
    }]);
    let mut g = Guest::new(2);
    let (mut c, _) = setup(&p, &g, 2, Some(None), 0, false);

    // GET_CONFIG as QEMU 7.2 does it: 57 bytes.
    let (_, cfg) =
        c.fe.get_config(0, 57, VhostUserConfigFlags::empty(), &[0u8; 57])
            .unwrap();
    let cap = u64::from_le_bytes(cfg[0..8].try_into().unwrap());
    assert_eq!(cap, BLOCKS * u64::from(BS) / 512);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), BS);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 126);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    // Only the writeback byte is writable.
    assert!(c
        .fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .is_ok());
    assert!(c
        .fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .is_err());

    // Write 4 KiB at sector 8 on queue 1, read it back on queue 0.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    g.write(data_gpa(1, 0), &pattern);
    assert_eq!(g.io(1, 0, req_type::OUT, 8, 4096), 0);
    assert_eq!(g.used_elem(1, 0), (0, 1), "head 0, status byte only");
    let mut cnt = [0u8; 8];
    // SAFETY: reading 8 bytes from an eventfd we own into a local buffer.
    let r = unsafe { libc::read(c.calls[1].as_raw_fd(), cnt.as_mut_ptr().cast(), 8) };
    assert_eq!(r, 8, "call eventfd signalled");

    assert_eq!(g.io(0, 0, req_type::IN, 8, 4096), 0);
    assert_eq!(g.used_elem(0, 0).1, 4097);
    assert_eq!(g.read(data_gpa(0, 0), 4096), pattern);
    let disk = be.call(|c| c[0].1.snapshot(8 * 512, 4096));
    assert_eq!(disk, pattern);

    // GET_ID returns the serial.
    assert_eq!(g.io(0, 1, req_type::GET_ID, 0, 20), 0);
    assert_eq!(&g.read(data_gpa(0, 1), 5), b"disk0");

    // FLUSH, DISCARD, WRITE_ZEROES, unknown type, out of range.
    assert_eq!(g.io(0, 2, req_type::FLUSH, 0, 0), 0);
    g.write(data_gpa(0, 3), &range_segment(8, 4));
    assert_eq!(g.io(0, 3, req_type::DISCARD, 0, 16), 0);
    let disk = be.call(|c| c[0].1.snapshot(8 * 512, 4096));
    assert!(disk[..2048].iter().all(|&b| b == 0));
    assert_eq!(disk[2048..], pattern[2048..]);
    assert_eq!(g.io(0, 4, 99, 0, 0), 2, "unknown type → UNSUPP");
    assert_eq!(
        g.io(0, 5, req_type::IN, BLOCKS, 512),
        1,
        "beyond capacity → IOERR"
    );

    // GET_VRING_BASE stops the ring and returns the next avail index.
    assert_eq!(c.fe.get_vring_base(0).unwrap(), 6);
    assert_eq!(c.fe.get_vring_base(1).unwrap(), 1);
    drop(be);
}

#[test]
fn readonly_controller_rejects_writes() {
    let p = sock("ro");
    let be = BackendThread::start(vec![CtrlSpec {
        path: p.clone(),
        readonly: true,
        queues: 1,
    }]);
    let mut g = Guest::new(1);
    let (c, _) = setup(&p, &g, 1, None, 0, false);
    let f = c.fe.get_features().unwrap();
    assert_ne!(f & feat::RO, 0);
    g.write(data_gpa(0, 0), &[0xab; 512]);
    assert_eq!(g.io(0, 0, req_type::OUT, 0, 512), 1);
    g.write(data_gpa(0, 1), &range_segment(0, 1));
    assert_ne!(g.io(0, 1, req_type::WRITE_ZEROES, 0, 16), 0);
    assert_eq!(g.io(0, 2, req_type::IN, 0, 512), 0);
    assert_eq!(
        be.call(|c| c[0].1.executed()),
        1,
        "only the read reached the target"
    );
}

#[test]
fn second_connection_refused_and_reconnect_works() {
    let p = sock("second");
    let be = BackendThread::start(vec![CtrlSpec {
        path: p.clone(),
        readonly: false,
        queues: 1,
    }]);
    let mut g = Guest::new(1);
    let (c, _) = setup(&p, &g, 1, None, 0, false);
    let other = connect(&p, 1);
    assert!(other.get_features().is_err(), "second connection is closed");
    g.request(0, 0, req_type::IN, 0, 512);
    g.wait_used(0, 1);
    drop(c);
    // Wait for the disconnect, then a new connection works.
    wait_until("backend", || !be.call(|c| c[0].0.connected()));
    let (_c2, _) = setup(&p, &g, 1, None, 1, false);
    assert_eq!(g.io(0, 1, req_type::IN, 0, 512), 0);
    let st = be.call(|c| c[0].0.stats());
    assert_eq!((st.connections, st.refused), (2, 1));
    let mode = std::fs::metadata(&p).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

/// Each malicious chain gets IOERR or resets its device; the good device keeps serving and the
/// process survives.
#[test]
fn malicious_chains() {
    let pbad = sock("bad");
    let pgood = sock("good");
    let be = BackendThread::start(vec![
        CtrlSpec {
            path: pbad.clone(),
            readonly: false,
            queues: 1,
        },
        CtrlSpec {
            path: pgood.clone(),
            readonly: false,
            queues: 1,
        },
    ]);
    let mut good = Guest::new(1);
    let (_cg, _) = setup(&pgood, &good, 1, None, 0, false);
    let mut good_n = 0u16;
    let mut good_ok = |good: &mut Guest| {
        let k = good_n % 5;
        good.request(0, k, req_type::IN, 0, 512);
        good_n += 1;
        good.wait_used(0, good_n);
        assert_eq!(good.status(0, k), 0);
    };

    // Cases with a usable status byte → IOERR. Each: (name, build fn) writing descriptors for
    // head 0 in a fresh connection.
    type Build = fn(&Guest, u64);
    let t = desc_gpa(0);
    let iocases: Vec<(&str, Build)> = vec![
        ("data out of range", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(
                t,
                1,
                MEM_SIZE - 256,
                4096,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            );
            g.desc(t, 2, h + 16, 1, VRING_DESC_F_WRITE, 0);
        }),
        ("next out of table", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, h + 16, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 400);
        }),
        ("loop", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, h + 16, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
        }),
        ("wrong direction: IN data readable", |g, t| {
            let h = hdr_gpa(0, 0);
            g.write(h, &[0u8; 16]);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, h + 17, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
            g.desc(t, 2, data_gpa(0, 0), 512, VRING_DESC_F_NEXT, 3);
            g.desc(t, 3, h + 16, 1, VRING_DESC_F_WRITE, 0);
        }),
        ("wrong direction: header writable", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
            g.desc(t, 1, h + 16, 1, VRING_DESC_F_WRITE, 0);
        }),
        ("header too short", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 8, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, h + 16, 1, VRING_DESC_F_WRITE, 0);
        }),
        ("indirect table out of range", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, MEM_SIZE - 32, 64, VRING_DESC_F_INDIRECT, 0);
            // A status byte the backend could use would be inside the bad table: none usable.
            let _ = h;
        }),
        ("indirect with a loop", |g, t| {
            let h = hdr_gpa(0, 0);
            let it = data_gpa(0, 3);
            g.desc(t, 0, it, 48, VRING_DESC_F_INDIRECT, 0);
            g.desc(it, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(it, 1, h + 16, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
            g.desc(it, 2, h + 16, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
        }),
        ("nested indirect", |g, t| {
            let h = hdr_gpa(0, 0);
            let it = data_gpa(0, 3);
            g.desc(t, 0, it, 32, VRING_DESC_F_INDIRECT, 0);
            g.desc(it, 0, h + 16, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
            g.desc(it, 1, it, 32, VRING_DESC_F_INDIRECT, 0);
        }),
        ("too long (> queue cap)", |g, t| {
            // An indirect table of 256 entries (cap is max(queue size, 128)).
            let h = hdr_gpa(0, 0);
            let it = data_gpa(0, 3);
            g.desc(t, 0, it, 256 * 16, VRING_DESC_F_INDIRECT, 0);
            g.desc(it, 0, h + 16, 1, VRING_DESC_F_WRITE, 0);
        }),
        (
            "status buffer empty (len 0 → not usable), data last",
            |g, t| {
                let h = hdr_gpa(0, 0);
                g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
                g.desc(t, 1, h + 16, 0, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
                g.desc(t, 2, h + 17, 1, 0, 0);
            },
        ),
        ("status readable", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, h + 16, 1, 0, 0);
        }),
        ("region crossing", |g, t| {
            let h = hdr_gpa(0, 0);
            g.desc(t, 0, h, 16, VRING_DESC_F_NEXT, 1);
            g.desc(t, 1, MEM_SIZE - 1, 2, VRING_DESC_F_WRITE, 0);
        }),
    ];
    let mut resets = 0;
    for (i, (name, build)) in iocases.iter().enumerate() {
        let mut g = Guest::new(1);
        // A valid IN header so only the chain shape is wrong.
        let mut h = Vec::new();
        h.extend_from_slice(&req_type::IN.to_le_bytes());
        h.extend_from_slice(&[0u8; 12]);
        g.write(hdr_gpa(0, 0), &h);
        g.write(hdr_gpa(0, 0) + 16, &[0xff, 0xff]);
        build(&g, t);
        let (c, _) = setup(&pbad, &g, 1, None, 0, false);
        g.push_avail(0, 0);
        // Either IOERR in the status byte (and the request used), or a device reset.
        let t0 = Instant::now();
        loop {
            let broken = be.call(|c| c[0].0.broken().map(str::to_string));
            if let Some(why) = broken {
                eprintln!("case {i} {name}: device reset ({why})");
                resets += 1;
                break;
            }
            if g.used_idx(0) == 1 {
                assert_eq!(g.status(0, 0), 1, "case {name}: IOERR");
                eprintln!("case {i} {name}: IOERR");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "case {name}: no outcome"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        good_ok(&mut good);
        drop(c);
        wait_until("backend", || !be.call(|c| c[0].0.connected()));
    }
    assert!(
        resets >= 2,
        "cases without a usable status byte reset the device"
    );

    // Ring-level garbage: head index out of the table, and avail idx far ahead.
    for case in 0..2 {
        let mut g = Guest::new(1);
        let (c, _) = setup(&pbad, &g, 1, None, 0, false);
        if case == 0 {
            g.push_avail(0, 999);
        } else {
            g.write(avail_gpa(0) + 2, &500u16.to_le_bytes());
        }
        wait_until("backend", || !be.call(|c| c[0].0.broken().is_none()));
        good_ok(&mut good);
        drop(c);
        wait_until("backend", || !be.call(|c| c[0].0.connected()));
        g.avail_idx[0] = 0;
    }

    // Malformed protocol messages: the connection is dropped, the process and the good device
    // keep going, and a fresh connection to the bad controller works again.
    let mut s = UnixStream::connect(&pbad).unwrap();
    use std::io::Write;
    // SET_MEM_TABLE claiming 1 region but no fd, then a body-too-large header.
    let mut m = Vec::new();
    m.extend_from_slice(&5u32.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&40u32.to_ne_bytes());
    m.extend_from_slice(&[0u8; 40]);
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0x10_0000u32.to_ne_bytes());
    s.write_all(&m).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::Read;
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "malformed connection closed");
    assert!(t0.elapsed() < Duration::from_secs(5));
    good_ok(&mut good);
    let mut g = Guest::new(1);
    let (_c, _) = setup(&pbad, &g, 1, None, 0, false);
    assert_eq!(g.io(0, 0, req_type::IN, 0, 512), 0);
    let stats = be.call(|c| c[0].0.stats());
    assert!(stats.resets >= 4, "{stats:?}");
}

/// Out-of-order completion, then a crash with requests in flight: after a reconnect with the old
/// inflight region, exactly the pending requests are resubmitted and each completes once.
#[test]
fn inflight_resubmit_after_reconnect() {
    let p = sock("inflight");
    let be = BackendThread::start(vec![CtrlSpec {
        path: p.clone(),
        readonly: false,
        queues: 1,
    }]);
    be.call(|c| c[0].1.set_auto(false));
    let mut g = Guest::new(1);
    let (c, region) = setup(&p, &g, 1, Some(None), 0, false);
    let (info, file) = region.unwrap();

    // Five writes of distinct patterns to distinct sectors.
    for k in 0..5u16 {
        g.write(data_gpa(0, k), &[k as u8 + 1; 512]);
        g.request(0, k, req_type::OUT, u64::from(k) * 4, 512);
    }
    let t0 = Instant::now();
    while be.call(|c| c[0].1.pending()) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Complete out of order: 3, then 1.
    assert!(be.call(|c| c[0].1.complete_where(|_, off| off == 3 * 4 * 512)));
    assert!(be.call(|c| c[0].1.complete_where(|_, off| off == 4 * 512)));
    g.wait_used(0, 2);
    assert_eq!(g.used_elem(0, 0).0, 9, "head of slot 3 first");
    assert_eq!(g.used_elem(0, 1).0, 3, "then slot 1");
    let inflight = |f: &std::fs::File| {
        let mut v = vec![0u8; info.mmap_size as usize];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut v, 0).unwrap();
        v
    };
    let r = inflight(&file);
    let entry = |r: &[u8], i: usize| r[16 + 16 * i];
    assert_eq!(u16::from_le_bytes([r[8], r[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([r[14], r[15]]), 2, "inflight used_idx");
    for (head, want) in [(0, 1), (3, 0), (6, 1), (9, 0), (12, 1)] {
        assert_eq!(entry(&r, head), want, "head {head}");
    }

    // "Crash": the connection drops, then the target aborts what it still had.
    drop(c);
    wait_until("backend", || !be.call(|c| c[0].0.connected()));
    assert_eq!(be.call(|c| c[0].1.abort_pending()), 3);
    let executed_before = be.call(|c| c[0].1.executed());
    assert_eq!(executed_before, 2);

    // Reconnect like QEMU: only SET_INFLIGHT_FD with the old region, vring base = used idx.
    let (c2, _) = setup(&p, &g, 1, Some(Some((&info, &file))), g.used_idx(0), false);
    let t0 = Instant::now();
    while be.call(|c| c[0].1.pending()) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "resubmitted requests reach the target"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Resubmitted in fetch order: slots 0, 2, 4.
    let ops = be.call(|c| c[0].1.pending_ops());
    let offs: Vec<u64> = ops.iter().map(|o| o.1).collect();
    assert_eq!(offs, vec![0, 2 * 4 * 512, 4 * 4 * 512]);
    // A new request after the reconnect goes after them.
    g.write(data_gpa(0, 5), &[0x66; 512]);
    g.request(0, 5, req_type::OUT, 40, 512);
    be.call(|c| c[0].1.set_auto(true));
    g.wait_used(0, 6);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(g.used_idx(0), 6, "nothing completes twice");
    let mut heads: Vec<u32> = (0..6).map(|i| g.used_elem(0, i).0).collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9, 12, 15]);
    for k in 0..5u16 {
        assert_eq!(g.status(0, k), 0);
        let d = be.call(move |c| c[0].1.snapshot(usize::from(k) * 4 * 512, 512));
        assert!(d.iter().all(|&b| b == k as u8 + 1), "slot {k} data");
    }
    assert_eq!(be.call(|c| c[0].1.executed()), 2 + 3 + 1);
    let r = inflight(&file);
    assert!(
        (0..usize::from(QS)).all(|i| entry(&r, i) == 0),
        "nothing left inflight"
    );
    assert_eq!(u16::from_le_bytes([r[14], r[15]]), 6);
    assert_eq!(c2.fe.get_vring_base(0).unwrap(), 6);
}

/// GET_VRING_BASE waits for in-flight requests, so the base it returns covers only completed
/// work; EVENT_IDX suppresses interrupts the driver did not ask for.
#[test]
fn get_vring_base_drains_and_event_idx() {
    let p = sock("drain");
    let be = BackendThread::start(vec![CtrlSpec {
        path: p.clone(),
        readonly: false,
        queues: 1,
    }]);
    let mut g = Guest::new(1);
    let (c, _) = setup(&p, &g, 1, None, 0, true);
    let (fe, call) = (c.fe, &c.calls[0]);
    // used_event = 2: the driver wants an interrupt only once used idx passes 2.
    g.write(avail_gpa(0) + 4 + 2 * u64::from(QS), &2u16.to_le_bytes());
    let drain = |call: &EventFd| {
        let mut b = [0u8; 8];
        // SAFETY: 8-byte read from our eventfd into a local buffer.
        let r = unsafe { libc::read(call.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        r == 8
    };
    g.request(0, 0, req_type::IN, 0, 512);
    g.wait_used(0, 1);
    assert!(drain(call), "first completion always signals");
    g.request(0, 1, req_type::IN, 0, 512);
    g.wait_used(0, 2);
    std::thread::sleep(Duration::from_millis(5));
    assert!(!drain(call), "used idx 2 does not pass used_event 2");
    g.request(0, 2, req_type::IN, 0, 512);
    g.wait_used(0, 3);
    std::thread::sleep(Duration::from_millis(5));
    assert!(drain(call), "used idx 3 passes used_event 2");
    // avail_event keeps kicks off (we poll).
    assert_eq!(g.r16(used_gpa(0) + 4 + 8 * u64::from(QS)), 2);

    be.call(|c| c[0].1.set_auto(false));
    g.request(0, 3, req_type::IN, 0, 512);
    let t0 = Instant::now();
    while be.call(|c| c[0].1.pending()) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = fe.get_vring_base(0);
        tx.send(()).unwrap();
        r
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        rx.try_recv().is_err(),
        "GET_VRING_BASE waits for the in-flight request"
    );
    be.call(|c| c[0].1.set_auto(true));
    assert_eq!(h.join().unwrap().unwrap(), 4);
    assert_eq!(g.used_idx(0), 4);
}

/// Requests that must always be answered are answered even when refused.
#[test]
fn refused_requests_still_reply() {
    use super::backend::{Backend, Outcome};
    use super::msg::{req, Header, Message, VERSION};
    let t = MemTarget::new(BS, BLOCKS);
    let geo = super::blk::BlkGeometry {
        block_size: BS,
        num_blocks: BLOCKS,
        readonly: false,
        num_queues: 2,
        serial: [0; 20],
        discard: true,
        write_zeroes: true,
        flush: true,
    };
    drop(t);
    let mut b = Backend::new("unit", geo, 1);
    let msg = |request: u32, body: Vec<u8>| Message {
        hdr: Header {
            request,
            flags: VERSION,
            size: body.len() as u32,
        },
        body,
        fds: Vec::new(),
    };
    let mut cfg = Vec::new();
    cfg.extend_from_slice(&250u32.to_ne_bytes());
    cfg.extend_from_slice(&10u32.to_ne_bytes());
    cfg.extend_from_slice(&0u32.to_ne_bytes());
    cfg.extend_from_slice(&[0u8; 10]);
    match b.handle(msg(req::GET_CONFIG, cfg)) {
        Outcome::Reply(body) => assert_eq!(&body[4..8], &0u32.to_ne_bytes(), "size 0 = failed"),
        o => panic!("{o:?}"),
    }
    // Short bodies and bad indices: GET_* still reply.
    for r in [
        req::GET_FEATURES,
        req::GET_PROTOCOL_FEATURES,
        req::GET_QUEUE_NUM,
    ] {
        assert!(matches!(b.handle(msg(r, vec![])), Outcome::Reply(_)));
    }
    assert!(matches!(
        b.handle(msg(req::GET_VRING_BASE, vec![9, 0, 0, 0, 0, 0, 0, 0])),
        Outcome::Reply(_)
    ));
    assert!(matches!(
        b.handle(msg(req::GET_VRING_BASE, vec![])),
        Outcome::Reply(_)
    ));
    match b.handle(msg(req::GET_INFLIGHT_FD, vec![0; 24])) {
        Outcome::Reply(body) => assert_eq!(&body[0..8], &0u64.to_ne_bytes()),
        o => panic!("{o:?}"),
    }
    assert!(matches!(
        b.handle(msg(req::GET_INFLIGHT_FD, vec![])),
        Outcome::Reply(_)
    ));
    assert!(matches!(b.handle(msg(77, vec![])), Outcome::Ack(false)));
    assert!(matches!(
        b.handle(msg(req::SET_MEM_TABLE, vec![1, 0, 0, 0])),
        Outcome::Ack(false)
    ));
}
