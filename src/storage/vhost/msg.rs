//! vhost-user message framing: a 12-byte header, a body, and file descriptors in SCM_RIGHTS.
//!
//! [`MsgReader`] assembles one message from a non-blocking socket across as many polls as it
//! takes; every size and fd count is bounds-checked before anything is allocated or kept, and fds
//! that arrive with a message we reject are closed (they are [`OwnedFd`]s from the moment they are
//! received).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Protocol version carried in the low two bits of `flags`.
pub const VERSION: u32 = 0x1;
/// Set on every reply from the back-end.
pub const FLAG_REPLY: u32 = 0x4;
/// The front-end asks for an ack (with `REPLY_ACK` negotiated).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Header length in bytes.
pub const HDR_LEN: usize = 12;
/// Largest body we accept: the biggest legal message is SET_MEM_TABLE (8 + 8 * 32 bytes) or a
/// GET/SET_CONFIG with a 256-byte config space.
pub const MAX_BODY: usize = 4096;
/// Most fds one message may carry (8 memory regions).
pub const MAX_FDS: usize = 8;

/// Front-end request codes we know by name.
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
}

/// vhost-user protocol feature bits.
pub mod proto {
    /// Several queues; GET_QUEUE_NUM.
    pub const MQ: u64 = 1 << 0;
    /// Acks on request (NEED_REPLY).
    pub const REPLY_ACK: u64 = 1 << 3;
    /// GET_CONFIG / SET_CONFIG.
    pub const CONFIG: u64 = 1 << 9;
    /// GET_INFLIGHT_FD / SET_INFLIGHT_FD.
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
}

/// The feature bit that says the back-end speaks GET/SET_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version, REPLY, NEED_REPLY.
    pub flags: u32,
    /// Body length.
    pub size: u32,
}

impl Header {
    /// Parses 12 native-endian bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        Header {
            request: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            flags: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            size: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    /// The 12 bytes on the wire.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// Whether the front-end asked for an ack.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// A complete message from the front-end.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub hdr: Header,
    /// Its body (`hdr.size` bytes).
    pub body: Vec<u8>,
    /// The fds that came with it; whatever the handler does not take is closed on drop.
    pub fds: Vec<OwnedFd>,
}

/// Little readers over a body, all bounds-checked.
pub struct Body<'a>(pub &'a [u8]);

impl Body<'_> {
    /// u16 at `off`.
    pub fn u16(&self, off: usize) -> Option<u16> {
        let b = self.0.get(off..off.checked_add(2)?)?;
        Some(u16::from_ne_bytes([b[0], b[1]]))
    }
    /// u32 at `off`.
    pub fn u32(&self, off: usize) -> Option<u32> {
        let b = self.0.get(off..off.checked_add(4)?)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// u64 at `off`.
    pub fn u64(&self, off: usize) -> Option<u64> {
        let b = self.0.get(off..off.checked_add(8)?)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_ne_bytes(a))
    }
}

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum MsgError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// A header we refuse (bad version, oversized body, too many fds).
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Assembles messages from a non-blocking stream socket.
#[derive(Debug, Default)]
pub struct MsgReader {
    hdr: [u8; HDR_LEN],
    hdr_got: usize,
    body: Vec<u8>,
    body_got: usize,
    fds: Vec<OwnedFd>,
}

impl MsgReader {
    /// A reader with nothing buffered.
    pub fn new() -> MsgReader {
        MsgReader::default()
    }

    /// Whether part of a message has been received.
    pub fn partial(&self) -> bool {
        self.hdr_got > 0
    }

    /// Reads what is available; `Ok(Some)` once a whole message is in, `Ok(None)` if the socket
    /// has nothing more for now.
    pub fn poll(&mut self, fd: RawFd) -> Result<Option<Message>, MsgError> {
        while self.hdr_got < HDR_LEN {
            if !fill(fd, &mut self.hdr, &mut self.hdr_got, &mut self.fds)? {
                return Ok(None);
            }
            if self.hdr_got == HDR_LEN {
                let hdr = Header::parse(&self.hdr);
                if hdr.flags & 0x3 != VERSION {
                    return Err(MsgError::Malformed("unsupported protocol version"));
                }
                if hdr.size as usize > MAX_BODY {
                    return Err(MsgError::Malformed("body too large"));
                }
                self.body = vec![0u8; hdr.size as usize];
                self.body_got = 0;
            }
        }
        while self.body_got < self.body.len() {
            if !fill(fd, &mut self.body, &mut self.body_got, &mut self.fds)? {
                return Ok(None);
            }
        }
        let msg = Message {
            hdr: Header::parse(&self.hdr),
            body: std::mem::take(&mut self.body),
            fds: std::mem::take(&mut self.fds),
        };
        self.hdr_got = 0;
        self.body_got = 0;
        Ok(Some(msg))
    }
}

/// One read into `buf[*got..]`; `Ok(false)` if the socket has nothing now.
fn fill(
    fd: RawFd,
    buf: &mut [u8],
    got: &mut usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, MsgError> {
    loop {
        match recv_with_fds(fd, &mut buf[*got..], fds) {
            Ok(0) => return Err(MsgError::Closed),
            Ok(n) => {
                *got += n;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if fds.len() > MAX_FDS {
        return Err(MsgError::Malformed("too many fds"));
    }
    Ok(true)
}

/// One non-blocking `recvmsg`: data into `buf`, any SCM_RIGHTS fds appended to `fds`
/// (close-on-exec). More than `MAX_FDS` is refused by the caller.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    crate::scm::recvmsg_fds(fd, buf, fds, libc::MSG_DONTWAIT)
}

/// Sends a reply (header + body, optionally one or more fds) on a possibly non-blocking socket,
/// waiting for writability if needed (replies are small; the peer is blocked reading them).
pub fn send_reply(fd: RawFd, request: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let hdr = Header {
        request,
        flags: VERSION | FLAG_REPLY,
        size: body.len() as u32,
    };
    let mut data = Vec::with_capacity(HDR_LEN + body.len());
    data.extend_from_slice(&hdr.bytes());
    data.extend_from_slice(body);
    send_with_fds(fd, &data, fds)
}

/// Writes all of `data`, attaching `fds` to the first chunk.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many fds"));
    }
    let mut off = 0;
    let mut first = true;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while off < data.len() {
        let attach = if first { fds } else { &[] };
        let n = match crate::scm::sendmsg_fds(fd, &data[off..], attach, 0) {
            Ok(n) => n,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if std::time::Instant::now() < deadline => {
                    wait_fd(fd, libc::POLLOUT, 10);
                    continue;
                }
                _ => return Err(e),
            },
        };
        first = false;
        off += n as usize;
    }
    Ok(())
}

/// `poll(2)` on one fd for `events`, at most `ms` milliseconds; true if ready.
pub fn wait_fd(fd: RawFd, events: i16, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: p is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Writes 1 to an eventfd (a call/err notification); EAGAIN (counter saturated) is fine.
pub fn signal_eventfd(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}
