//! `nbd`: a remote storage system reached from user space over the NBD protocol.
//!
//! Handshake: fixed newstyle, `NBD_OPT_GO` for the export (falling back to `NBD_OPT_EXPORT_NAME`
//! when the server does not know GO), simple replies. Each reactor channel has its own connection
//! (TCP or Unix socket, non-blocking, polled by the reactor) with many requests in flight, told
//! apart by their handles.
//!
//! Connection loss: every request sent and not answered goes back, in submission order, to the
//! head of the channel's queue, new requests queue behind them, and a helper thread reconnects
//! (connection set-up is blocking and must not stall the reactor). When the connection is back
//! the queue is sent again. Nothing is reported to the caller while this takes less than
//! `reconnect_timeout_ms`; after that the held requests fail with `ENOTCONN` and new ones fail
//! at once until the server is back. Resending a request the server may already have executed is
//! safe: block reads and writes are idempotent (two overlapping writes in flight at once have no
//! defined order on any disk).

use super::bdev::{
    BackendChannel, BdevBackend, BdevError, BdevInfo, Completions, IoKind, IoRequest, IoStatus,
};
use super::malloc::default_bs;
use super::registry::{parse_params, BackendType, Params};
use crossbeam_channel::{Receiver, TryRecvError};
use serde::Deserialize;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const INFO_EXPORT: u16 = 0;

/// Transmission flags.
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// Largest read/write payload sent in one request (qemu-nbd's limit).
pub const MAX_IO: u64 = 32 << 20;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    /// `unix:/path` or a path starting with `/`.
    Unix(PathBuf),
    /// `tcp:host:port` or `host:port`.
    Tcp(String),
}

impl std::str::FromStr for NbdAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(NbdAddress::Unix(p.into()));
        }
        if s.starts_with('/') {
            return Ok(NbdAddress::Unix(s.into()));
        }
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(NbdAddress::Tcp(hp.to_string()))
            }
            _ => Err(format!(
                "nbd address {s:?}: expected unix:/path, /path, tcp:host:port or host:port"
            )),
        }
    }
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// `nbd` parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdParams {
    /// Server address (see [`NbdAddress`]).
    pub address: String,
    /// Export name (default: the server's default export, "").
    #[serde(default)]
    pub export: String,
    /// Block size (default 512).
    #[serde(default = "default_bs")]
    pub block_size: u32,
    /// How long requests are held while reconnecting before they fail (default 30000 ms).
    #[serde(default = "default_reconnect")]
    pub reconnect_timeout_ms: u64,
    /// Time allowed for one connection attempt and handshake (default 5000 ms).
    #[serde(default = "default_connect")]
    pub connect_timeout_ms: u64,
    /// Requests in flight per connection (default 128).
    #[serde(default = "default_inflight")]
    pub max_inflight: u32,
}

fn default_reconnect() -> u64 {
    30_000
}
fn default_connect() -> u64 {
    5_000
}
fn default_inflight() -> u32 {
    128
}

fn parse(p: &Params) -> Result<(NbdParams, NbdAddress), BdevError> {
    let n: NbdParams = parse_params("nbd", p)?;
    let addr = n.address.parse().map_err(BdevError::Params)?;
    if !n.block_size.is_power_of_two() || !(512..=65536).contains(&n.block_size) {
        return Err(BdevError::Params(format!(
            "nbd: block_size {} must be a power of two from 512 to 65536",
            n.block_size
        )));
    }
    if !(1..=4096).contains(&n.max_inflight) {
        return Err(BdevError::Params(
            "nbd: max_inflight must be from 1 to 4096".into(),
        ));
    }
    if n.export.len() > 4096 {
        return Err(BdevError::Params(
            "nbd: export name longer than 4096 bytes".into(),
        ));
    }
    Ok((n, addr))
}

/// Registry entry.
pub const BACKEND: BackendType = BackendType {
    check: |p| parse(p).map(|_| ()),
    create: |p| {
        let (n, a) = parse(p)?;
        Ok(Box::new(NbdBackend::connect(n, a)?))
    },
};

/// A connected socket.
pub enum Conn {
    /// Unix socket.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Conn {
    fn connect(addr: &NbdAddress, timeout: Duration) -> io::Result<Conn> {
        match addr {
            NbdAddress::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Conn::Unix(s))
            }
            NbdAddress::Tcp(hp) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{hp}: no address"));
                for sa in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            s.set_read_timeout(Some(timeout))?;
                            s.set_write_timeout(Some(timeout))?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(true),
            Conn::Tcp(s) => s.set_nonblocking(true),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake learnt about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Client side of the fixed-newstyle handshake, up to transmission phase.
pub fn handshake(s: &mut (impl Read + Write), export: &str) -> io::Result<ExportInfo> {
    if read_u64(s)? != NBDMAGIC {
        return Err(proto("not an NBD server (bad magic)"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(proto(
            "old-style NBD server: newstyle negotiation is required",
        ));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server does not speak fixed newstyle"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(FLAG_NO_ZEROES)
        } else {
            0
        };
    s.write_all(&cflags.to_be_bytes())?;
    // NBD_OPT_GO: name length, name, no information requests.
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut info = None;
    loop {
        if read_u64(s)? != REPLY_MAGIC {
            return Err(proto("bad option reply magic"));
        }
        let _opt = read_u32(s)?;
        let typ = read_u32(s)?;
        let len = read_u32(s)? as usize;
        if len > 1 << 20 {
            return Err(proto("option reply too long"));
        }
        let mut d = vec![0u8; len];
        s.read_exact(&mut d)?;
        match typ {
            REP_ACK => break,
            REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([d[10], d[11]]);
                info = Some(ExportInfo { size, flags });
            }
            REP_ERR_UNSUP => return export_name(s, export, no_zeroes),
            t if t & 0x8000_0000 != 0 => {
                let text = String::from_utf8_lossy(&d).into_owned();
                let what = match t & 0x7fff_ffff {
                    2 => "policy refused",
                    3 => "invalid option",
                    6 => "unknown export",
                    7 => "server shutting down",
                    _ => "error",
                };
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "export {export:?}: {what} ({t:#x}){}",
                        if text.is_empty() {
                            String::new()
                        } else {
                            format!(": {text}")
                        }
                    ),
                ));
            }
            _ => {}
        }
    }
    info.ok_or_else(|| proto("server acknowledged NBD_OPT_GO without export information"))
}

fn export_name(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
) -> io::Result<ExportInfo> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(ExportInfo { size, flags })
}

/// Encodes a transmission request header.
pub fn encode_request(out: &mut Vec<u8>, cmd: u16, handle: u64, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A simple reply header: (error, handle), or None if the magic is wrong.
pub fn decode_reply(h: &[u8; 16]) -> Option<(u32, u64)> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return None;
    }
    let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let mut hb = [0u8; 8];
    hb.copy_from_slice(&h[8..16]);
    Some((err, u64::from_be_bytes(hb)))
}

struct Target {
    addr: NbdAddress,
    export: String,
    info: ExportInfo,
    connect_timeout: Duration,
    reconnect_timeout: Duration,
    max_inflight: u32,
}

fn connect(t: &NbdAddress, export: &str, timeout: Duration) -> io::Result<(Conn, ExportInfo)> {
    let mut c = Conn::connect(t, timeout)?;
    let info = handshake(&mut c, export)?;
    Ok((c, info))
}

/// The NBD storage system.
pub struct NbdBackend {
    target: Arc<Target>,
    block_size: u32,
}

impl NbdBackend {
    /// Connects once (to learn the export's size and flags, and to fail early on an unreachable
    /// server), then disconnects; channels open their own connections.
    pub fn connect(p: NbdParams, addr: NbdAddress) -> Result<NbdBackend, BdevError> {
        let timeout = Duration::from_millis(p.connect_timeout_ms.max(1));
        let (mut c, info) = connect(&addr, &p.export, timeout).map_err(|err| BdevError::Io {
            what: format!("nbd {addr} export {:?}", p.export),
            err,
        })?;
        let mut disc = Vec::new();
        encode_request(&mut disc, CMD_DISC, 0, 0, 0);
        let _ = c.write_all(&disc);
        if info.size < u64::from(p.block_size) {
            return Err(BdevError::Backend(format!(
                "nbd {addr}: export {:?} is smaller than one block",
                p.export
            )));
        }
        Ok(NbdBackend {
            target: Arc::new(Target {
                addr,
                export: p.export,
                info,
                connect_timeout: timeout,
                reconnect_timeout: Duration::from_millis(p.reconnect_timeout_ms),
                max_inflight: p.max_inflight,
            }),
            block_size: p.block_size,
        })
    }
}

impl BdevBackend for NbdBackend {
    fn type_name(&self) -> &'static str {
        "nbd"
    }
    fn info(&self) -> BdevInfo {
        BdevInfo {
            block_size: self.block_size,
            num_blocks: self.target.info.size / u64::from(self.block_size),
            read_only: self.target.info.flags & TF_READ_ONLY != 0,
            max_io_bytes: MAX_IO,
        }
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let n = self.target.max_inflight as usize;
        let mut ch = NbdChannel {
            t: self.target.clone(),
            state: State::Down,
            down_since: Some(Instant::now()),
            connector: None,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n as u32).rev().collect(),
            queue: VecDeque::new(),
            out: Vec::with_capacity(1 << 20),
            out_pos: 0,
            inbuf: vec![0u8; 256 << 10],
            in_start: 0,
            in_end: 0,
            payload: None,
            seq: 0,
            reconnects: 0,
        };
        ch.start_connect();
        Ok(Box::new(ch))
    }
}

struct Slot {
    req: IoRequest,
    seq: u64,
}

enum State {
    Up(Conn),
    Down,
}

struct Connector {
    rx: Receiver<(Conn, ExportInfo)>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A read reply whose payload is arriving: (slot, bytes received so far).
type Payload = (u32, usize);

struct NbdChannel {
    t: Arc<Target>,
    state: State,
    down_since: Option<Instant>,
    connector: Option<Connector>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Held and new requests, in the order they will be sent (replays first).
    queue: VecDeque<(IoRequest, u64)>,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    payload: Option<Payload>,
    seq: u64,
    reconnects: u64,
}

fn status_of(nbd_err: u32) -> IoStatus {
    match nbd_err as i32 {
        0 => IoStatus::Success,
        libc::EOPNOTSUPP => IoStatus::Unsupported,
        e => IoStatus::IoError(e),
    }
}

impl NbdChannel {
    fn start_connect(&mut self) {
        if self.connector.is_some() {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let c2 = cancel.clone();
        let t = self.t.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-connect".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(20);
                let mut logged = false;
                while !c2.load(Ordering::Relaxed) {
                    match connect(&t.addr, &t.export, t.connect_timeout) {
                        Ok((c, info)) if info.size == t.info.size => {
                            let _ = tx.send((c, info));
                            return;
                        }
                        Ok((_, info)) => {
                            log::error!(
                                "nbd {} export {:?}: size changed from {} to {}: not using it",
                                t.addr,
                                t.export,
                                t.info.size,
                                info.size
                            );
                        }
                        Err(e) if !logged => {
                            log::warn!(
                                "nbd {} export {:?}: connecting: {e} (retrying)",
                                t.addr,
                                t.export
                            );
                            logged = true;
                        }
                        Err(_) => {}
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            });
        match spawned {
            Ok(_) => self.connector = Some(Connector { rx, cancel }),
            Err(e) => log::error!("nbd {}: cannot start connector thread: {e}", self.t.addr),
        }
    }

    /// The connection broke: hold everything in flight for resending, reconnect.
    fn lost(&mut self, why: &str) {
        if matches!(self.state, State::Up(_)) {
            log::warn!(
                "nbd {} export {:?}: connection lost ({why}): holding {} requests, reconnecting",
                self.t.addr,
                self.t.export,
                self.slots.len() - self.free.len()
            );
        }
        self.state = State::Down;
        self.down_since.get_or_insert_with(Instant::now);
        let mut held: Vec<Slot> = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(slot) = s.take() {
                held.push(slot);
                self.free.push(i as u32);
            }
        }
        held.sort_by_key(|s| s.seq);
        for s in held.into_iter().rev() {
            self.queue.push_front((s.req, s.seq));
        }
        self.out.clear();
        self.out_pos = 0;
        self.in_start = 0;
        self.in_end = 0;
        self.payload = None;
        self.start_connect();
    }

    /// Moves queued requests into slots and encodes them (connected only).
    fn encode(&mut self, done: &mut Completions) -> usize {
        let mut n = 0;
        let flags = self.t.info.flags;
        while self.out.len() < (4 << 20) {
            let Some(&i) = self.free.last() else { break };
            let Some((req, seq)) = self.queue.pop_front() else {
                break;
            };
            let (cmd, len) = match req.kind {
                IoKind::Read => (CMD_READ, req.len),
                IoKind::Write => (CMD_WRITE, req.len),
                IoKind::Flush if flags & TF_SEND_FLUSH == 0 => {
                    done.push(req, IoStatus::Success); // no volatile cache to flush
                    continue;
                }
                IoKind::Flush => (CMD_FLUSH, 0),
                IoKind::Unmap if flags & TF_SEND_TRIM == 0 => {
                    done.push(req, IoStatus::Success); // discard is a hint
                    continue;
                }
                IoKind::Unmap => (CMD_TRIM, req.len),
                IoKind::WriteZeroes if flags & TF_SEND_WRITE_ZEROES != 0 => {
                    (CMD_WRITE_ZEROES, req.len)
                }
                IoKind::WriteZeroes if req.len <= MAX_IO => (CMD_WRITE, req.len), // zero payload below
                IoKind::WriteZeroes => {
                    done.push(req, IoStatus::Unsupported);
                    continue;
                }
            };
            let Ok(len32) = u32::try_from(len) else {
                done.push(req, IoStatus::Invalid);
                continue;
            };
            self.free.pop();
            encode_request(&mut self.out, cmd, u64::from(i), req.offset, len32);
            if cmd == CMD_WRITE {
                match (&req.buf, req.kind) {
                    (Some(b), IoKind::Write) => self.out.extend_from_slice(b.as_slice()),
                    _ => self.out.resize(self.out.len() + len as usize, 0),
                }
            }
            self.slots[i as usize] = Some(Slot { req, seq });
            n += 1;
        }
        n
    }

    fn send(&mut self) -> Result<usize, String> {
        let State::Up(c) = &mut self.state else {
            return Ok(0);
        };
        let mut sent = 0;
        while self.out_pos < self.out.len() {
            match c.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(k) => {
                    self.out_pos += k;
                    sent += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(sent)
    }

    fn recv(&mut self, done: &mut Completions) -> Result<usize, String> {
        let mut work = 0;
        loop {
            // Parse what is buffered.
            loop {
                let avail = self.in_end - self.in_start;
                if let Some((slot, got)) = self.payload {
                    let Some(s) = self.slots.get_mut(slot as usize).and_then(|s| s.as_mut()) else {
                        return Err("payload for an unknown request".into());
                    };
                    let Some(b) = s.req.buf.as_mut() else {
                        return Err("read without buffer".into());
                    };
                    let k = avail.min(b.len() - got);
                    b.as_mut_slice()[got..got + k]
                        .copy_from_slice(&self.inbuf[self.in_start..self.in_start + k]);
                    self.in_start += k;
                    if got + k == b.len() {
                        self.payload = None;
                        self.finish(slot, IoStatus::Success, done);
                        work += 1;
                        continue;
                    }
                    self.payload = Some((slot, got + k));
                    break;
                }
                if avail < 16 {
                    break;
                }
                let mut h = [0u8; 16];
                h.copy_from_slice(&self.inbuf[self.in_start..self.in_start + 16]);
                self.in_start += 16;
                let Some((err, handle)) = decode_reply(&h) else {
                    return Err("bad reply magic (structured replies were not negotiated)".into());
                };
                let slot = handle as usize;
                let Some(s) = self.slots.get(slot).and_then(|s| s.as_ref()) else {
                    return Err(format!("reply for unknown handle {handle}"));
                };
                if err == 0 && s.req.kind == IoKind::Read {
                    self.payload = Some((slot as u32, 0));
                } else {
                    self.finish(slot as u32, status_of(err), done);
                    work += 1;
                }
            }
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            } else if self.in_start > self.inbuf.len() / 2 {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let State::Up(c) = &mut self.state else {
                return Ok(work);
            };
            if self.in_end == self.inbuf.len() {
                return Ok(work);
            }
            match c.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(k) => {
                    self.in_end += k;
                    work += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(work),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn finish(&mut self, slot: u32, st: IoStatus, done: &mut Completions) {
        if let Some(s) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            self.free.push(slot);
            done.push(s.req, st);
        }
    }

    fn fail_held(&mut self, done: &mut Completions, st: IoStatus) {
        while let Some((r, _)) = self.queue.pop_front() {
            done.push(r, st);
        }
    }
}

impl BackendChannel for NbdChannel {
    fn submit(&mut self, req: IoRequest, done: &mut Completions) {
        if let Some(since) = self.down_since {
            if since.elapsed() > self.t.reconnect_timeout {
                done.push(req, IoStatus::IoError(libc::ENOTCONN));
                return;
            }
        }
        self.seq += 1;
        self.queue.push_back((req, self.seq));
    }

    fn poll(&mut self, done: &mut Completions) -> usize {
        let mut work = 0;
        if let State::Down = self.state {
            let got = match &self.connector {
                Some(c) => match c.rx.try_recv() {
                    Ok(x) => Some(x),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        self.connector = None;
                        None
                    }
                },
                None => None,
            };
            match got {
                Some((conn, _)) => {
                    self.connector = None;
                    if let Err(e) = conn.set_nonblocking() {
                        self.lost(&e.to_string());
                        return 0;
                    }
                    if self.reconnects > 0
                        || self
                            .down_since
                            .is_some_and(|s| s.elapsed() > Duration::from_millis(100))
                    {
                        log::info!(
                            "nbd {} export {:?}: connected after {:?}; resending {} held requests",
                            self.t.addr,
                            self.t.export,
                            self.down_since.map(|s| s.elapsed()).unwrap_or_default(),
                            self.queue.len()
                        );
                    }
                    self.reconnects += 1;
                    self.state = State::Up(conn);
                    self.down_since = None;
                    work += 1;
                }
                None => {
                    if self.connector.is_none() {
                        self.start_connect();
                    }
                    if self
                        .down_since
                        .is_some_and(|s| s.elapsed() > self.t.reconnect_timeout)
                        && !self.queue.is_empty()
                    {
                        log::error!(
                            "nbd {} export {:?}: unreachable for {:?}: failing {} held requests",
                            self.t.addr,
                            self.t.export,
                            self.t.reconnect_timeout,
                            self.queue.len()
                        );
                        self.fail_held(done, IoStatus::IoError(libc::ENOTCONN));
                        return 1;
                    }
                    return 0;
                }
            }
        }
        work += self.encode(done);
        match self.send() {
            Ok(k) => work += k.min(1),
            Err(e) => {
                self.lost(&e);
                return work + 1;
            }
        }
        match self.recv(done) {
            Ok(k) => work += k,
            Err(e) => {
                self.lost(&e);
                return work + 1;
            }
        }
        work
    }

    fn inflight(&self) -> usize {
        self.queue.len() + self.slots.len() - self.free.len()
    }

    fn ready(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    fn abort(&mut self, done: &mut Completions) {
        self.connector = None;
        for i in 0..self.slots.len() {
            if let Some(s) = self.slots[i].take() {
                self.free.push(i as u32);
                done.push(s.req, IoStatus::Aborted);
            }
        }
        self.fail_held(done, IoStatus::Aborted);
        if let State::Up(c) = &mut self.state {
            let mut disc = Vec::new();
            encode_request(&mut disc, CMD_DISC, 0, 0, 0);
            let _ = c.write(&disc);
        }
        self.state = State::Down;
    }
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        let mut sink = Completions::default();
        self.abort(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted stream: reads come from `input`, writes are collected.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn server_greeting(flags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBDMAGIC.to_be_bytes());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn opt_reply(v: &mut Vec<u8>, opt: u32, typ: u32, data: &[u8]) {
        v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }

    #[test]
    fn handshake_with_go() {
        let mut v = server_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut info = Vec::new();
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&(64u64 << 20).to_be_bytes());
        info.extend_from_slice(&(1u16 | TF_SEND_FLUSH).to_be_bytes());
        opt_reply(&mut v, OPT_GO, REP_INFO, &[0, 5, 0, 0]); // some other info: ignored
        opt_reply(&mut v, OPT_GO, REP_INFO, &info);
        opt_reply(&mut v, OPT_GO, REP_ACK, &[]);
        let mut s = Script {
            input: Cursor::new(v),
            output: Vec::new(),
        };
        let i = handshake(&mut s, "disk0").unwrap();
        assert_eq!(
            i,
            ExportInfo {
                size: 64 << 20,
                flags: 1 | TF_SEND_FLUSH
            }
        );
        // client flags, then the GO option with the name.
        assert_eq!(&s.output[..4], &3u32.to_be_bytes());
        assert_eq!(&s.output[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&s.output[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&s.output[16..20], &(4 + 5 + 2u32).to_be_bytes());
        assert_eq!(&s.output[24..29], b"disk0");
    }

    #[test]
    fn handshake_falls_back_to_export_name_and_reports_errors() {
        let mut v = server_greeting(FLAG_FIXED_NEWSTYLE);
        opt_reply(&mut v, OPT_GO, REP_ERR_UNSUP, &[]);
        v.extend_from_slice(&(1u64 << 20).to_be_bytes());
        v.extend_from_slice(&3u16.to_be_bytes());
        v.extend_from_slice(&[0u8; 124]);
        let mut s = Script {
            input: Cursor::new(v),
            output: Vec::new(),
        };
        assert_eq!(
            handshake(&mut s, "").unwrap(),
            ExportInfo {
                size: 1 << 20,
                flags: 3
            }
        );

        let mut v = server_greeting(FLAG_FIXED_NEWSTYLE);
        opt_reply(&mut v, OPT_GO, 0x8000_0006, b"no such export");
        let mut s = Script {
            input: Cursor::new(v),
            output: Vec::new(),
        };
        let e = handshake(&mut s, "x").unwrap_err().to_string();
        assert!(
            e.contains("unknown export") && e.contains("no such export"),
            "{e}"
        );

        let mut s = Script {
            input: Cursor::new(vec![0u8; 18]),
            output: Vec::new(),
        };
        assert!(handshake(&mut s, "").is_err());
        let mut s = Script {
            input: Cursor::new(server_greeting(0)),
            output: Vec::new(),
        };
        assert!(handshake(&mut s, "")
            .unwrap_err()
            .to_string()
            .contains("fixed newstyle"));
    }

    #[test]
    fn request_and_reply_encoding() {
        let mut out = Vec::new();
        encode_request(&mut out, CMD_WRITE, 7, 4096, 512);
        assert_eq!(out.len(), 28);
        assert_eq!(&out[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&out[6..8], &1u16.to_be_bytes());
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&5u32.to_be_bytes());
        h[8..].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(decode_reply(&h), Some((5, 9)));
        h[0] = 0;
        assert_eq!(decode_reply(&h), None);
        assert_eq!(status_of(5), IoStatus::IoError(5));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(NbdAddress::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "/run/x.sock".parse(),
            Ok(NbdAddress::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(NbdAddress::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "tcp:[::1]:10809".parse(),
            Ok(NbdAddress::Tcp("[::1]:10809".into()))
        );
        assert!("nbd-server".parse::<NbdAddress>().is_err());
        assert!("host:port".parse::<NbdAddress>().is_err());
    }
}
