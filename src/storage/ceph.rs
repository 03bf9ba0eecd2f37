//! The safe layer over librados/librbd (`rbd-sys`): cluster handles shared between bdevs, pool IO
//! contexts, open images and asynchronous image IO. Only this module calls `rbd-sys`.
//!
//! Threads: librados/librbd handles are thread-safe, so [`Cluster`] and [`Image`] are `Send +
//! Sync` and shared with `Arc`. Asynchronous IO completes on librbd's own threads: [`Image::aio`]
//! takes an [`AioCtx`] (owning the request's buffer) and librbd gives it back to the completion
//! callback, which forwards it — buffer included — as a message on the submitter's queue. So a
//! buffer is owned by exactly one party at a time: the request, then the in-flight `AioCtx`
//! (librbd reads or writes it), then the completion message.

use super::bdev::IoBuf;
use crossbeam_channel::Sender;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// A librados/librbd failure: what was being done, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {}", strerror(*.errno))]
pub struct CephError {
    /// What failed, with the names involved (monitor address, pool, image).
    pub what: String,
    /// Positive errno.
    pub errno: i32,
}

/// `strerror` for a positive errno.
pub fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn check(rc: i32, what: impl FnOnce() -> String) -> Result<i32, CephError> {
    if rc < 0 {
        Err(CephError {
            what: what(),
            errno: -rc,
        })
    } else {
        Ok(rc)
    }
}

fn cstr(what: &str, s: &str) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| CephError {
        what: format!("{what} {s:?} contains a NUL byte"),
        errno: libc::EINVAL,
    })
}

/// What identifies a cluster connection: bdevs with equal keys share one [`Cluster`].
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterKey {
    /// Ceph user (`client.<id>`); `None` = librados' default (`admin`).
    pub user_id: Option<String>,
    /// A ceph.conf to read; `None` with an empty `config` = librados' default search.
    pub config_file: Option<String>,
    /// A keyring file (`keyring` option).
    pub key_file: Option<String>,
    /// Options set after the file (SPDK's `config` key/value map), e.g. `mon_host`.
    pub config: BTreeMap<String, String>,
}

/// Timeouts applied to a new cluster handle unless `config` sets the option itself.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// `client_mount_timeout` and `rados_mon_op_timeout`: bounds connecting at create.
    pub connect: Duration,
    /// `rados_osd_op_timeout`: an OSD op not answered in this time fails with `ETIMEDOUT`.
    pub osd_op: Duration,
}

/// A connected librados cluster handle, shared (refcounted) by the bdevs of one cluster.
pub struct Cluster {
    handle: rbd_sys::rados_t,
    key: ClusterKey,
    mon_host: String,
}

// SAFETY: librados cluster handles are thread-safe (the C API may be called from any thread).
unsafe impl Send for Cluster {}
// SAFETY: as above; the Rust side holds no interior state besides immutable strings.
unsafe impl Sync for Cluster {}

fn clusters() -> &'static Mutex<BTreeMap<ClusterKey, Weak<Cluster>>> {
    static C: OnceLock<Mutex<BTreeMap<ClusterKey, Weak<Cluster>>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

fn secs(d: Duration) -> String {
    d.as_secs().max(1).to_string()
}

impl Cluster {
    /// The connected cluster for `key`: an existing one if a live bdev uses it, else a new
    /// connection (blocking, bounded by `t.connect`). Control plane only.
    pub fn get(key: &ClusterKey, t: Timeouts) -> Result<Arc<Cluster>, CephError> {
        // Connecting happens under the lock: two bdevs of one new cluster created at once must
        // not connect twice. Creation is control-plane work; the lock is never on the IO path.
        let mut map = clusters().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(key).and_then(Weak::upgrade) {
            return Ok(c);
        }
        map.retain(|_, w| w.strong_count() > 0);
        let c = Arc::new(Cluster::connect(key, t)?);
        map.insert(key.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    /// How many live clusters are cached (for tests).
    pub fn live() -> usize {
        let map = clusters().lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    fn connect(key: &ClusterKey, t: Timeouts) -> Result<Cluster, CephError> {
        let user = key
            .user_id
            .as_deref()
            .map(|u| cstr("user_id", u))
            .transpose()?;
        let mut h: rbd_sys::rados_t = ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; `user` is a NUL-terminated string or null.
        let rc = unsafe {
            rbd_sys::rados_create(&mut h, user.as_ref().map_or(ptr::null(), |u| u.as_ptr()))
        };
        check(rc, || "rados_create".into())?;
        // From here `c` owns the handle: an early return shuts it down.
        let mut c = Cluster {
            handle: h,
            key: key.clone(),
            mon_host: String::new(),
        };
        match &key.config_file {
            Some(f) => {
                let p = cstr("config_file", f)?;
                // SAFETY: handle is a created, unconnected cluster; p is NUL-terminated.
                let rc = unsafe { rbd_sys::rados_conf_read_file(c.handle, p.as_ptr()) };
                check(rc, || format!("reading Ceph config file {f}"))?;
            }
            None if key.config.is_empty() => {
                // SAFETY: a null path makes librados search its default locations.
                let rc = unsafe { rbd_sys::rados_conf_read_file(c.handle, ptr::null()) };
                check(rc, || {
                    "reading the default Ceph config (/etc/ceph/ceph.conf)".into()
                })?;
            }
            None => {}
        }
        let defaults = [
            ("client_mount_timeout", secs(t.connect)),
            ("rados_mon_op_timeout", secs(t.connect)),
            ("rados_osd_op_timeout", secs(t.osd_op)),
            // Discard must leave zeros behind (reads after an unmap), not skip partial objects.
            ("rbd_skip_partial_discard", "false".into()),
            // A write completes when the OSDs have it, as on a disk without a volatile cache
            // (librbd's writeback cache would acknowledge writes it may still lose).
            ("rbd_cache", "false".into()),
        ];
        for (k, v) in defaults {
            if !key.config.contains_key(k) {
                c.set(k, &v)?;
            }
        }
        if let Some(k) = &key.key_file {
            c.set("keyring", k)?;
        }
        for (k, v) in &key.config {
            c.set(k, v)?;
        }
        c.mon_host = c.get_opt("mon_host").unwrap_or_default();
        // SAFETY: handle is configured and not yet connected.
        let rc = unsafe { rbd_sys::rados_connect(c.handle) };
        check(rc, || {
            format!(
                "cannot connect to the Ceph cluster at mon_host {:?} as client.{} within {} s",
                c.mon_host,
                key.user_id.as_deref().unwrap_or("admin"),
                secs(t.connect)
            )
        })?;
        Ok(c)
    }

    fn set(&mut self, k: &str, v: &str) -> Result<(), CephError> {
        let (ck, cv) = (cstr("config key", k)?, cstr("config value", v)?);
        // SAFETY: handle is live and unconnected; both strings are NUL-terminated.
        let rc = unsafe { rbd_sys::rados_conf_set(self.handle, ck.as_ptr(), cv.as_ptr()) };
        check(rc, || format!("Ceph config option {k} = {v:?}")).map(|_| ())
    }

    fn get_opt(&self, k: &str) -> Option<String> {
        let ck = CString::new(k).ok()?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: buf is writable for its length; librados NUL-terminates within it.
        let rc = unsafe {
            rbd_sys::rados_conf_get(
                self.handle,
                ck.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
            )
        };
        if rc < 0 {
            return None;
        }
        CStr::from_bytes_until_nul(&buf)
            .ok()
            .map(|s| s.to_string_lossy().into_owned())
    }

    /// The monitor address(es) the handle was configured with.
    pub fn mon_host(&self) -> &str {
        &self.mon_host
    }

    /// The key it was made from.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Opens an IO context on `pool`.
    pub fn ioctx(self: &Arc<Self>, pool: &str) -> Result<IoCtx, CephError> {
        let p = cstr("pool", pool)?;
        let mut io: rbd_sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: handle is connected; `io` is a valid out-pointer.
        let rc = unsafe { rbd_sys::rados_ioctx_create(self.handle, p.as_ptr(), &mut io) };
        check(rc, || {
            format!(
                "pool {pool:?} on the cluster at mon_host {:?}",
                self.mon_host
            )
        })?;
        Ok(IoCtx {
            io,
            pool: pool.into(),
            _cluster: self.clone(),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every IoCtx/Image holds an Arc<Cluster>, so none is left; shut down once.
        unsafe { rbd_sys::rados_shutdown(self.handle) };
    }
}

/// A pool's IO context (keeps its cluster alive).
pub struct IoCtx {
    io: rbd_sys::rados_ioctx_t,
    pool: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados IO contexts are thread-safe for the calls made here (stat, rbd_open).
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Size of object `oid` (`ENOENT` when it does not exist). Blocking.
    pub fn stat(&self, oid: &str) -> Result<u64, CephError> {
        let o = cstr("object", oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: io is live; out-pointers are valid.
        let rc = unsafe { rbd_sys::rados_stat(self.io, o.as_ptr(), &mut size, &mut mtime) };
        check(rc, || format!("stat {}/{oid}", self.pool))?;
        Ok(size)
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: images opened on this ioctx hold an Arc<IoCtx> and are closed first.
        unsafe { rbd_sys::rados_ioctx_destroy(self.io) };
    }
}

/// What an asynchronous request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioOp {
    /// Read `len` bytes at `offset` into the buffer.
    Read,
    /// Write the buffer at `offset`.
    Write,
    /// Flush the image's cache.
    Flush,
    /// Discard.
    Discard,
    /// Write zeroes.
    WriteZeroes,
}

/// An in-flight request as librbd holds it: it owns the data buffer until the completion
/// callback sends it back as an [`AioDone`].
pub struct AioCtx {
    /// Submitter's slot.
    pub slot: u32,
    /// Submitter's generation of that slot (tells stale completions apart).
    pub gen: u32,
    /// The data buffer (reads and writes).
    pub buf: Option<IoBuf>,
    /// Where the completion goes (the submitting channel's queue).
    pub tx: Sender<AioDone>,
}

/// A completion, as a message to the submitter.
pub struct AioDone {
    /// Submitter's slot.
    pub slot: u32,
    /// Slot generation.
    pub gen: u32,
    /// librbd's return value (bytes or 0 on success, negative errno on failure).
    pub rc: i64,
    /// The buffer, back to the submitter.
    pub buf: Option<IoBuf>,
}

/// librbd's completion callback, on a librbd thread. Touches nothing but the `AioCtx` it owns
/// now and the submitter's (thread-safe) queue.
unsafe extern "C" fn aio_complete(c: rbd_sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<AioCtx> leaked in `Image::aio`; librbd calls this exactly once
    // per completion, so ownership comes back here exactly once.
    let ctx = unsafe { Box::from_raw(arg as *mut AioCtx) };
    // SAFETY: `c` is the completion this callback was registered on; it is complete.
    let rc = unsafe { rbd_sys::rbd_aio_get_return_value(c) } as i64;
    // SAFETY: we own the completion's last reference; nothing uses `c` afterwards.
    unsafe { rbd_sys::rbd_aio_release(c) };
    let AioCtx { slot, gen, buf, tx } = *ctx;
    // A closed channel means the submitter is gone: the message (and buffer) is dropped here.
    let _ = tx.send(AioDone { slot, gen, rc, buf });
}

/// An open RBD image (keeps its pool context and cluster alive).
pub struct Image {
    image: rbd_sys::rbd_image_t,
    name: String,
    id: String,
    ioctx: Arc<IoCtx>,
}

// SAFETY: librbd image handles are thread-safe for asynchronous IO and the queries made here.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens `name` in `ioctx`'s pool. Blocking.
    pub fn open(ioctx: Arc<IoCtx>, name: &str) -> Result<Image, CephError> {
        let n = cstr("image", name)?;
        let mut image: rbd_sys::rbd_image_t = ptr::null_mut();
        // SAFETY: ioctx is live; `image` is a valid out-pointer; no snapshot.
        let rc = unsafe { rbd_sys::rbd_open(ioctx.io, n.as_ptr(), &mut image, ptr::null()) };
        check(rc, || format!("opening image {}/{name}", ioctx.pool))?;
        let mut img = Image {
            image,
            name: name.into(),
            id: String::new(),
            ioctx,
        };
        let mut buf = vec![0u8; 128];
        let rc =
            // SAFETY: image is open; buf is writable for its length.
            unsafe { rbd_sys::rbd_get_id(img.image, buf.as_mut_ptr() as *mut c_char, buf.len()) };
        if rc >= 0 {
            img.id = CStr::from_bytes_until_nul(&buf)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        Ok(img)
    }

    /// `pool/image`.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.ioctx.pool, self.name)
    }

    /// The image's size as librbd knows it (refreshes the header if it changed). Blocking.
    pub fn size(&self) -> Result<u64, CephError> {
        let mut s = 0u64;
        // SAFETY: image is open; `s` is a valid out-pointer.
        let rc = unsafe { rbd_sys::rbd_get_size(self.image, &mut s) };
        check(rc, || format!("size of {}", self.spec()))?;
        Ok(s)
    }

    /// Whether the image's header object still exists (false once the image is removed).
    /// Blocking (one OSD round trip).
    pub fn header_exists(&self) -> Result<bool, CephError> {
        if self.id.is_empty() {
            return Ok(true); // format 1 image: no id, no check
        }
        match self.ioctx.stat(&format!("rbd_header.{}", self.id)) {
            Ok(_) => Ok(true),
            Err(e) if e.errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts an asynchronous request. On success librbd owns `ctx` (and its buffer) until the
    /// completion message arrives on `ctx.tx`. On failure (librbd refused it synchronously) `ctx`
    /// comes back with the errno.
    pub fn aio(
        &self,
        op: AioOp,
        offset: u64,
        len: u64,
        ctx: Box<AioCtx>,
    ) -> Result<(), (Box<AioCtx>, i32)> {
        let len_sz = match usize::try_from(len) {
            Ok(l) => l,
            Err(_) => return Err((ctx, libc::EINVAL)),
        };
        if matches!(op, AioOp::Read | AioOp::Write)
            && ctx.buf.as_ref().map(IoBuf::len) != Some(len_sz)
        {
            return Err((ctx, libc::EINVAL));
        }
        let raw = Box::into_raw(ctx);
        // SAFETY: raw is a valid, uniquely owned AioCtx until the callback (or the error path
        // below) takes it back; we only read the buffer pointer, whose allocation does not move.
        let data = unsafe {
            (*raw)
                .buf
                .as_mut()
                .map_or(ptr::null_mut(), |b| b.as_mut_ptr())
        };
        let mut c: rbd_sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; the callback has the signature librbd expects.
        let rc = unsafe {
            rbd_sys::rbd_aio_create_completion(raw as *mut c_void, Some(aio_complete), &mut c)
        };
        if rc < 0 {
            // SAFETY: no completion was created, so nothing else will take `raw` back.
            return Err((unsafe { Box::from_raw(raw) }, -rc));
        }
        // SAFETY: image is open (Image lives until after every channel using it); `data` points
        // to `len` bytes owned by the AioCtx, which librbd keeps until it calls `aio_complete`.
        let rc = unsafe {
            match op {
                AioOp::Read => {
                    rbd_sys::rbd_aio_read(self.image, offset, len_sz, data as *mut c_char, c)
                }
                AioOp::Write => {
                    rbd_sys::rbd_aio_write(self.image, offset, len_sz, data as *const c_char, c)
                }
                AioOp::Flush => rbd_sys::rbd_aio_flush(self.image, c),
                AioOp::Discard => rbd_sys::rbd_aio_discard(self.image, offset, len, c),
                AioOp::WriteZeroes => {
                    rbd_sys::rbd_aio_write_zeroes(self.image, offset, len_sz, c, 0, 0)
                }
            }
        };
        if rc < 0 {
            // librbd did not take the request: the callback will not run.
            // SAFETY: release the unused completion, then reclaim our context.
            unsafe { rbd_sys::rbd_aio_release(c) };
            // SAFETY: as above, `raw` is ours again.
            return Err((unsafe { Box::from_raw(raw) }, -rc));
        }
        Ok(())
    }

    /// Registers `cb` to run (on a librbd thread) when the image header changes (resize, ...).
    /// The returned watch must be dropped before the image.
    pub fn watch(self: &Arc<Self>, cb: Box<dyn Fn() + Send + Sync>) -> Result<Watch, CephError> {
        let arg = Box::into_raw(Box::new(cb));
        let mut handle = 0u64;
        // SAFETY: image is open; `arg` stays valid until `Watch::drop` unregisters the callback.
        let rc = unsafe {
            rbd_sys::rbd_update_watch(self.image, &mut handle, Some(update_cb), arg as *mut c_void)
        };
        if rc < 0 {
            // SAFETY: registration failed, so librbd holds no copy of `arg`.
            drop(unsafe { Box::from_raw(arg) });
            return Err(CephError {
                what: format!("watching {}", self.spec()),
                errno: -rc,
            });
        }
        Ok(Watch {
            image: self.clone(),
            handle,
            arg,
        })
    }
}

type WatchFn = Box<dyn Fn() + Send + Sync>;

unsafe extern "C" fn update_cb(arg: *mut c_void) {
    // SAFETY: `arg` is the Box<WatchFn> registered in `Image::watch`, alive until unwatch.
    let f = unsafe { &*(arg as *const WatchFn) };
    f();
}

/// A header-update watch; unregistered on drop.
pub struct Watch {
    image: Arc<Image>,
    handle: u64,
    arg: *mut WatchFn,
}

// SAFETY: the callback box is Send + Sync; unwatch may run on any thread.
unsafe impl Send for Watch {}
// SAFETY: `&Watch` gives no access to the callback or the handle.
unsafe impl Sync for Watch {}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: handle came from rbd_update_watch on this image; after unwatch returns librbd
        // no longer calls the callback, so the box can be freed.
        unsafe {
            rbd_sys::rbd_update_unwatch(self.image.image, self.handle);
            drop(Box::from_raw(self.arg));
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: every channel and watch holds an Arc<Image>, so none is left. rbd_close waits
        // for in-flight IO; their completions go to queues whose receivers may be gone (fine).
        unsafe { rbd_sys::rbd_close(self.image) };
    }
}
