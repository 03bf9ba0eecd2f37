//! The JSON-RPC server on a Unix socket.
//!
//! One acceptor thread, one thread per connection up to [`Limits::max_connections`] (a client
//! beyond that gets an error and is closed). Each connection splits its byte stream into JSON
//! values ([`JsonStream`]); a value is decoded and executed only while holding one of
//! [`Limits::max_executing`] slots, so the memory of decoded requests is bounded no matter how
//! many clients send at once. Connection threads block in `read` with a short timeout, so they
//! notice a stop request; writes time out, so a client that never reads cannot pin a thread.
//!
//! The socket is created mode 0600 (only the owner, normally root, can connect): it is bound in
//! a private 0700 directory, chmod'ed, then renamed into place, so there is no moment when it
//! is reachable with wider permissions and no process-wide umask is touched.

use super::jsonrpc::{self, RpcError, INVALID_REQUEST, PARSE_ERROR};
use super::registry::Registry;
use super::stream::{JsonStream, StreamError};
use serde_json::Value;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where `hostplane run` listens and `hostplane rpc` connects by default.
pub const DEFAULT_SOCKET: &str = "/var/tmp/hostplane.sock";

/// Resource bounds of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections served at once.
    pub max_connections: usize,
    /// Requests decoded/executed at once (across all connections).
    pub max_executing: usize,
    /// Largest request (one JSON value, a batch included), in bytes.
    pub max_request: usize,
    /// Most requests in one batch.
    pub max_batch: usize,
    /// A connection holding part of a request this long without a new byte is closed.
    pub partial_timeout: Duration,
    /// A response write blocked this long closes the connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_executing: 4,
            max_request: 1 << 20,
            max_batch: 1024,
            partial_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process accepts connections on the path.
    #[error("{0}: another process is serving JSON-RPC on this socket (stop it, or pick another path with -r)")]
    InUse(String),
    /// The path exists and is not a socket: never delete it.
    #[error("{0}: exists and is not a socket")]
    NotASocket(String),
    /// Any other OS error, with what was being done.
    #[error("{path}: {what}: {err}")]
    Io {
        /// Socket path.
        path: String,
        /// Step that failed.
        what: &'static str,
        /// Cause.
        err: io::Error,
    },
}

/// A bound socket, not yet serving (bind early to fail fast, serve once the methods exist).
pub struct RpcListener {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of our socket file, so we never remove someone else's.
    id: (u64, u64),
    /// Handed to another process (hot upgrade): leave the file alone.
    keep: AtomicBool,
}

impl RpcListener {
    /// Binds `path` with mode 0600. A live server on it is an error; a stale socket file (from
    /// a process that died) is removed.
    pub fn bind(path: &Path) -> Result<RpcListener, ServerError> {
        let p = path.display().to_string();
        let io = |what, err| ServerError::Io {
            path: p.clone(),
            what,
            err,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => return Err(ServerError::NotASocket(p)),
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(p)),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    log::info!("removing stale socket {p}");
                    std::fs::remove_file(path).map_err(|e| io("remove stale socket", e))?;
                }
                Err(e) => return Err(io("probe existing socket", e)),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("stat", e)),
        }
        let parent = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let private = parent.join(format!(".hostplane-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| io("create private dir", e))?;
        let result = (|| {
            let tmp = private.join("s");
            let listener = UnixListener::bind(&tmp).map_err(|e| io("bind", e))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("chmod", e))?;
            std::fs::rename(&tmp, path).map_err(|e| io("move into place", e))?;
            Ok(listener)
        })();
        let _ = std::fs::remove_dir_all(&private);
        let listener = result?;
        let m = std::fs::symlink_metadata(path).map_err(|e| io("stat", e))?;
        Ok(RpcListener {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
            keep: AtomicBool::new(false),
        })
    }

    /// A listening socket received from the process this one replaces (hot upgrade): already
    /// bound at `path`, already accepting clients into its backlog.
    pub fn from_fd(fd: std::os::fd::OwnedFd, path: &Path) -> Result<RpcListener, ServerError> {
        let p = path.display().to_string();
        let m = std::fs::symlink_metadata(path).map_err(|err| ServerError::Io {
            path: p,
            what: "stat",
            err,
        })?;
        Ok(RpcListener {
            listener: UnixListener::from(fd),
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
            keep: AtomicBool::new(false),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn remove_file(&self) {
        if self.keep.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for RpcListener {
    fn drop(&mut self) {
        self.remove_file();
    }
}

/// A counting semaphore for execution slots (control plane only; never on a data path).
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    /// Waits for a slot; `None` if `stop` is set meanwhile.
    fn acquire(self: &Arc<Self>, stop: &AtomicBool) -> Option<SlotGuard> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            free = self
                .cv
                .wait_timeout(free, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Some(SlotGuard(self.clone()))
    }
}

struct SlotGuard(Arc<Slots>);
impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

struct Shared {
    registry: Arc<Registry>,
    limits: Limits,
    stop: AtomicBool,
    active: AtomicUsize,
    slots: Arc<Slots>,
}

/// A serving JSON-RPC server. [`RpcServer::stop`] (or drop) stops it and removes the socket.
pub struct RpcServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    listener: Arc<RpcListener>,
}

impl RpcServer {
    /// Starts serving `registry` on `listener`.
    pub fn start(
        listener: RpcListener,
        registry: Arc<Registry>,
        limits: Limits,
    ) -> io::Result<RpcServer> {
        listener.listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            registry,
            limits,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            slots: Arc::new(Slots {
                free: Mutex::new(limits.max_executing.max(1)),
                cv: Condvar::new(),
            }),
        });
        let listener = Arc::new(listener);
        let (s, l) = (shared.clone(), listener.clone());
        let acceptor = std::thread::Builder::new()
            .name("rpc-accept".into())
            .spawn(move || accept_loop(&s, &l))?;
        Ok(RpcServer {
            shared,
            acceptor: Some(acceptor),
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Stops accepting, waits for the connection threads, removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// The listening socket (to hand to a new process; it stays open here until stop).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        self.listener.listener.as_raw_fd()
    }

    /// The socket now belongs to a new process: [`RpcServer::stop`] and drop leave the file.
    pub fn keep_socket(&self) {
        self.listener.keep.store(true, Ordering::SeqCst);
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        self.listener.remove_file();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits up to `ms` for the listener to become readable.
fn wait_readable(fd: i32, ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn accept_loop(shared: &Arc<Shared>, listener: &RpcListener) {
    // Each connection's thread and a handle on its socket, to unblock it at stop.
    let mut conns: Vec<(JoinHandle<()>, Option<UnixStream>)> = Vec::new();
    let fd = listener.listener.as_raw_fd();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.listener.accept() {
            Ok((stream, _)) => {
                conns.retain(|(h, _)| !h.is_finished());
                if shared.active.load(Ordering::SeqCst) >= shared.limits.max_connections {
                    reject(stream, shared.limits.max_connections);
                    continue;
                }
                shared.active.fetch_add(1, Ordering::SeqCst);
                let s = shared.clone();
                let unblock = stream.try_clone().ok();
                // A small stack: connection threads only frame bytes and run handlers; serde's
                // recursion limit (128) bounds the depth of decoding.
                let spawned = std::thread::Builder::new()
                    .name("rpc-conn".into())
                    .stack_size(1 << 20)
                    .spawn(move || {
                        serve_connection(&s, &stream);
                        // Shut down, not just drop: the acceptor holds a clone of this socket, and
                        // the client must see the close now.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        s.active.fetch_sub(1, Ordering::SeqCst);
                    });
                match spawned {
                    Ok(h) => conns.push((h, unblock)),
                    Err(e) => {
                        shared.active.fetch_sub(1, Ordering::SeqCst);
                        log::warn!("rpc: cannot start a connection thread: {e}");
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(fd, 200),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("rpc: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // A thread blocked writing to a client that does not read would otherwise hold the stop
    // for the whole write timeout.
    for (h, stream) in conns {
        if let Some(s) = stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = h.join();
    }
}

fn reject(stream: UnixStream, max: usize) {
    let _ = stream.set_nonblocking(true);
    let err = RpcError::new(
        jsonrpc::INTERNAL_ERROR,
        format!("too many connections (at most {max}); retry later"),
    );
    let _ = write_value(&stream, &jsonrpc::error_response(Value::Null, &err));
}

fn write_value(mut w: impl Write, v: &Value) -> io::Result<()> {
    let mut out = serde_json::to_vec(v).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out)
}

/// How a connection ends.
enum Close {
    /// Keep serving.
    No,
    /// Close after what was written.
    Yes,
}

fn serve_connection(shared: &Shared, stream: &UnixStream) {
    let limits = shared.limits;
    if stream
        .set_read_timeout(Some(Duration::from_millis(250)))
        .is_err()
        || stream
            .set_write_timeout(Some(limits.write_timeout))
            .is_err()
    {
        return;
    }
    let mut js = JsonStream::new(limits.max_request);
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_byte = Instant::now();
    let (mut reader, mut writer) = (stream, stream);
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        match reader.read(&mut buf) {
            Ok(0) => {
                if let Some(r) = js.finish() {
                    let mut out = Vec::new();
                    let _slot = shared.slots.acquire(&shared.stop);
                    if handle_value(shared, stream, r, &mut out).is_ok() {
                        let _ = writer.write_all(&out);
                    }
                }
                return;
            }
            Ok(n) => {
                last_byte = Instant::now();
                js.feed(&buf[..n]);
                loop {
                    // The slot covers decoding and execution; the answer is written after the
                    // slot is released, so a client that reads slowly holds up no one else.
                    let mut out = Vec::new();
                    let close = {
                        let Some(_slot) = shared.slots.acquire(&shared.stop) else {
                            return;
                        };
                        let Some(r) = js.next_value() else { break };
                        handle_value(shared, stream, r, &mut out)
                    };
                    if writer.write_all(&out).is_err() || !matches!(close, Ok(Close::No)) {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if js.pending() > 0 && last_byte.elapsed() > limits.partial_timeout {
                    let err = RpcError::invalid_request(format!(
                        "request incomplete after {:?} without data",
                        limits.partial_timeout
                    ));
                    let _ = write_value(stream, &jsonrpc::error_response(Value::Null, &err));
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Batch answers above this size are written out while the batch runs (the rest of the time
/// answers are written after the execution slot is released).
const BATCH_FLUSH: usize = 1 << 20;

/// Answers one framed value into `out`: a request, a batch, or a framing error (after which the
/// connection closes).
fn handle_value(
    shared: &Shared,
    mut stream: &UnixStream,
    r: Result<Value, StreamError>,
    out: &mut Vec<u8>,
) -> io::Result<Close> {
    let limits = &shared.limits;
    match r {
        Err(e) => {
            let err = match e {
                StreamError::Parse(m) => RpcError::new(PARSE_ERROR, format!("Parse error: {m}")),
                StreamError::Truncated => RpcError::new(
                    PARSE_ERROR,
                    "Parse error: incomplete JSON value at end of input",
                ),
                StreamError::TooLarge(n) => {
                    log::warn!("rpc: closing a connection that sent more than {n} bytes without a complete request");
                    RpcError::new(
                        INVALID_REQUEST,
                        format!("Invalid request: larger than {n} bytes"),
                    )
                }
            };
            write_value(out, &jsonrpc::error_response(Value::Null, &err))?;
            Ok(Close::Yes)
        }
        Ok(Value::Array(reqs)) => {
            if reqs.is_empty() {
                write_value(
                    out,
                    &jsonrpc::error_response(
                        Value::Null,
                        &RpcError::invalid_request("Invalid request: empty batch"),
                    ),
                )?;
                return Ok(Close::No);
            }
            if reqs.len() > limits.max_batch {
                let err = RpcError::invalid_request(format!(
                    "Invalid request: batch of {} requests (at most {})",
                    reqs.len(),
                    limits.max_batch
                ));
                write_value(out, &jsonrpc::error_response(Value::Null, &err))?;
                return Ok(Close::No);
            }
            let mut first = true;
            for req in reqs {
                if let Some(resp) = jsonrpc::handle_request(&shared.registry, req) {
                    out.push(if first { b'[' } else { b',' });
                    first = false;
                    serde_json::to_writer(&mut *out, &resp).map_err(io::Error::other)?;
                    if out.len() > BATCH_FLUSH {
                        stream.write_all(out)?;
                        out.clear();
                    }
                }
            }
            if !first {
                out.extend_from_slice(b"]\n");
            }
            Ok(Close::No)
        }
        Ok(req) => {
            if let Some(resp) = jsonrpc::handle_request(&shared.registry, req) {
                write_value(out, &resp)?;
            }
            Ok(Close::No)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(name: &str, limits: Limits) -> (RpcServer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("hp-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let mut reg = Registry::new();
        reg.register("big", |_| Ok(Value::String("x".repeat(4 << 20))));
        reg.register("echo", Ok);
        (
            RpcServer::start(RpcListener::bind(&path).unwrap(), Arc::new(reg), limits).unwrap(),
            path,
        )
    }

    fn ask(path: &Path, req: &str) -> Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut js = JsonStream::new(1 << 30);
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed without an answer");
            js.feed(&buf[..n]);
            if let Some(v) = js.next_value() {
                return v.unwrap();
            }
        }
    }

    #[test]
    fn connection_cap_and_prompt_stop_with_a_client_that_never_reads() {
        let (srv, path) = server(
            "cap",
            Limits {
                max_connections: 2,
                ..Limits::default()
            },
        );
        assert_eq!(
            ask(
                &path,
                r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":1}}"#
            )["result"],
            json!({"a": 1})
        );
        // The first client's thread ends on its own; wait so the cap is all the hogs'.
        let deadline = Instant::now() + Duration::from_secs(5);
        while srv.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Two clients that ask for 40 MiB of answers and never read them.
        let hogs: Vec<UnixStream> = (0..2)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                for _ in 0..10 {
                    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"big"}"#)
                        .unwrap();
                }
                s
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while srv.connections() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let v = ask(&path, r#"{"jsonrpc":"2.0","id":1,"method":"echo"}"#);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("too many connections"),
            "{v}"
        );
        let t = Instant::now();
        srv.stop();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "stop waited {:?} for blocked writers",
            t.elapsed()
        );
        assert!(!path.exists(), "socket removed at stop");
        drop(hogs);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
