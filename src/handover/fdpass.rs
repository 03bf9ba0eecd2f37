//! Messages with file descriptors between two hostplane processes (the handover socket).
//!
//! A message is a JSON document plus any number of fds. On the wire it is one or more frames
//! `[len: u32][nfds: u32][len bytes]` sent with `sendmsg`, the frame's fds attached as
//! SCM_RIGHTS to its first byte. Fds travel in frames of at most [`FDS_PER_FRAME`] (the kernel
//! caps one control message at 253); the frames before the last carry no payload (`len = 0`),
//! the last carries the JSON (`len > 0`). The receiver reads exact lengths, so a `recvmsg` never
//! crosses into the next frame and no fd is ever attributed to the wrong message.
//!
//! Sockets here are blocking with a timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` set by the caller): the
//! handover is a short control-plane exchange, never on a data path.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Fds per frame at most.
pub const FDS_PER_FRAME: usize = crate::scm::MAX_FDS_PER_CALL;
/// Largest JSON payload accepted (a handover state is a few KiB per controller).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Most fds accepted in one message.
pub const MAX_FDS: usize = 65536;

const HDR: usize = 8;

/// Sends `json` with `fds` (borrowed: the kernel duplicates them into the peer).
pub fn send(stream: &UnixStream, json: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if json.is_empty() || json.len() > MAX_PAYLOAD {
        return Err(io::Error::other("handover payload size out of range"));
    }
    let (before, with_json) = if fds.len() <= FDS_PER_FRAME {
        (&[][..], fds)
    } else {
        (fds, &[][..])
    };
    for c in before.chunks(FDS_PER_FRAME) {
        send_frame(stream, &[], c)?;
    }
    send_frame(stream, json, with_json)
}

fn send_frame(stream: &UnixStream, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut data = Vec::with_capacity(HDR + payload.len());
    data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    data.extend_from_slice(&(fds.len() as u32).to_le_bytes());
    data.extend_from_slice(payload);
    let fd = stream.as_raw_fd();
    let mut off = 0;
    while off < data.len() {
        let with_fds = off == 0 && !fds.is_empty();
        let n = sendmsg(fd, &data[off..], if with_fds { fds } else { &[] })?;
        off += n;
    }
    Ok(())
}

/// One `sendmsg` of `data` with `fds` attached (≤ [`FDS_PER_FRAME`]); returns the bytes sent.
fn sendmsg(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    debug_assert!(fds.len() <= FDS_PER_FRAME);
    loop {
        match crate::scm::sendmsg_fds(fd, data, fds, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Receives one message: the JSON payload and every fd sent with it, in order.
pub fn recv(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    loop {
        let mut hdr = [0u8; HDR];
        recv_exact(stream, &mut hdr, &mut fds)?;
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let nfds = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        if len > MAX_PAYLOAD || nfds > FDS_PER_FRAME || fds.len() > MAX_FDS {
            return Err(io::Error::other("malformed handover frame"));
        }
        let mut payload = vec![0u8; len];
        recv_exact(stream, &mut payload, &mut fds)?;
        if len > 0 {
            return Ok((payload, fds));
        }
    }
}

fn recv_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match recvmsg(stream.as_raw_fd(), &mut buf[got..], fds) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `recvmsg` into `buf`; SCM_RIGHTS fds are appended to `fds` (close-on-exec).
fn recvmsg(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    crate::scm::recvmsg_fds(fd, buf, fds, 0)
}

/// The fds of one outgoing message: objects register theirs and refer to them by index.
#[derive(Debug, Default)]
pub struct FdOut(pub Vec<RawFd>);

impl FdOut {
    /// Adds an fd; returns its index in the message.
    pub fn add(&mut self, fd: &impl AsRawFd) -> usize {
        self.0.push(fd.as_raw_fd());
        self.0.len() - 1
    }
}

/// The fds of one received message, each taken once by index.
#[derive(Debug, Default)]
pub struct FdIn(Vec<Option<OwnedFd>>);

impl FdIn {
    /// Wraps the fds received with a message.
    pub fn new(fds: Vec<OwnedFd>) -> FdIn {
        FdIn(fds.into_iter().map(Some).collect())
    }

    /// Takes fd `i` (an error if absent or already taken: a malformed state).
    pub fn take(&mut self, i: usize) -> io::Result<OwnedFd> {
        self.0
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other(format!("handover state names fd {i}: missing")))
    }

    /// Fds nobody took.
    pub fn left(&self) -> usize {
        self.0.iter().filter(|f| f.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn json_and_many_fds_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut files = Vec::new();
        for i in 0..150u32 {
            let mut f = tempfile(i);
            f.write_all(&i.to_le_bytes()).unwrap();
            files.push(f);
        }
        let raws: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let t = std::thread::spawn(move || {
            send(&a, b"{\"x\":1}", &raws).unwrap();
            send(&a, b"{\"y\":2}", &[]).unwrap();
            drop(files);
        });
        let (j, fds) = recv(&b).unwrap();
        assert_eq!(j, b"{\"x\":1}");
        assert_eq!(fds.len(), 150);
        for (i, fd) in fds.into_iter().enumerate() {
            let mut f = std::fs::File::from(fd);
            f.rewind().unwrap();
            let mut v = [0u8; 4];
            f.read_exact(&mut v).unwrap();
            assert_eq!(u32::from_le_bytes(v), i as u32);
        }
        let (j, fds) = recv(&b).unwrap();
        assert_eq!((j.as_slice(), fds.len()), (&b"{\"y\":2}"[..], 0));
        t.join().unwrap();
        assert_eq!(
            recv(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "peer gone"
        );
    }

    fn tempfile(i: u32) -> std::fs::File {
        let p = std::env::temp_dir().join(format!("hp-fdpass-{}-{i}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
