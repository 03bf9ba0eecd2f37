//! SCM_RIGHTS: one `sendmsg` with fds attached, one `recvmsg` that takes ownership of every fd it
//! receives. Shared by the vhost-user connection (`storage::vhost::msg`) and the handover socket
//! (`handover::fdpass`); each frames its own messages on top.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most fds in one call here (control buffers are sized for it).
pub const MAX_FDS_PER_CALL: usize = 64;
/// Control buffer: `MAX_FDS_PER_CALL` ints plus room for the header.
const CBUF_WORDS: usize = (MAX_FDS_PER_CALL * 4 + 64) / 8;

/// One `sendmsg(fd, data, MSG_NOSIGNAL | flags)` with `fds` (≤ [`MAX_FDS_PER_CALL`], borrowed:
/// the kernel duplicates them into the peer) attached to the first byte. Returns the bytes
/// sent; `Interrupted`/`WouldBlock` are returned to the caller, which decides to retry.
pub fn sendmsg_fds(fd: RawFd, data: &[u8], fds: &[RawFd], flags: i32) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_CALL {
        return Err(io::Error::other("too many fds for one message"));
    }
    let mut cbuf = [0u64; CBUF_WORDS];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        // SAFETY: pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: msg_control points at cbuf, which holds `space` bytes (≤ MAX_FDS_PER_CALL fds
        // plus the header fit in its 64 spare bytes).
        let c = unsafe { libc::CMSG_FIRSTHDR(&mh) };
        // SAFETY: c is the first cmsghdr inside cbuf (non-null: controllen ≥ one header); the
        // copy writes `payload` bytes at CMSG_DATA, inside `space`.
        unsafe {
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
        }
    }
    // SAFETY: mh describes live buffers (data, cbuf) for the duration of the call; the fds are
    // open in this process (the caller borrows them from live owners).
    let n = unsafe { libc::sendmsg(fd, &mh, libc::MSG_NOSIGNAL | flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `recvmsg(fd, buf, MSG_CMSG_CLOEXEC | flags)`; SCM_RIGHTS fds are appended to `fds`, owned
/// (close-on-exec) before anything else is checked, so none leaks when the caller refuses the
/// message. More fds than [`MAX_FDS_PER_CALL`] truncate the control data: an error.
pub fn recvmsg_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: i32,
) -> io::Result<usize> {
    let mut cbuf = [0u64; CBUF_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: mh points at a live iovec over `buf` and a live control buffer of the stated size.
    let n = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: mh was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&mh) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and inside cbuf (CMSG_FIRSTHDR/NXTHDR bound-check it).
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure size computation.
            let hdr_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let n_fds =
                (c.cmsg_len as usize).saturating_sub(hdr_len) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS cmsg holds n_fds ints inside cbuf.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            for i in 0..n_fds {
                // SAFETY: i < n_fds, inside the cmsg data; unaligned read (CMSG_DATA alignment
                // is not guaranteed for RawFd on every ABI).
                let raw = unsafe { std::ptr::read_unaligned(data.add(i)) };
                if raw >= 0 {
                    // SAFETY: the kernel just installed this fd in our table, for us alone.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: mh and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&mh, cmsg) };
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("control data truncated (too many fds)"));
    }
    Ok(n as usize)
}
