//! The NBD backend against a real `qemu-nbd`, over a Unix socket and over TCP on 127.0.0.1:
//! data integrity, read-only exports, an unreachable server, and qemu-nbd killed and restarted
//! while IO runs (requests held, the client reconnects, nothing lost or failed).

mod common;

use hostplane::storage::client::{compare, verify_patterns, BdevClient, Op};
use hostplane::storage::reactor::{ReactorOptions, ReactorSet};
use hostplane::storage::{BackendRegistry, IoStatus};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 << 20;

#[derive(Clone)]
enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

impl Listen {
    fn address(&self) -> String {
        match self {
            Listen::Unix(p) => format!("unix:{}", p.display()),
            Listen::Tcp(port) => format!("127.0.0.1:{port}"),
        }
    }
}

struct QemuNbd {
    child: Option<Child>,
    image: PathBuf,
    listen: Listen,
    read_only: bool,
}

impl QemuNbd {
    fn start(image: &Path, listen: Listen, read_only: bool) -> QemuNbd {
        let mut q = QemuNbd {
            child: None,
            image: image.to_path_buf(),
            listen,
            read_only,
        };
        q.spawn();
        q
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--persistent",
            "--shared=8",
            "-f",
            "raw",
            "-x",
            "disk0",
            "--discard=unmap",
        ]);
        if self.read_only {
            cmd.arg("-r");
        }
        match &self.listen {
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                cmd.arg("-k").arg(p);
            }
            Listen::Tcp(port) => {
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            }
        }
        cmd.arg(&self.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = Some(
            cmd.spawn()
                .expect("start qemu-nbd (apt-get install qemu-utils)"),
        );
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match &self.listen {
                Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("nbd.img");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&p)
        .arg(SIZE.to_string())
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    p
}

/// Integrity, then three kill/restart cycles of qemu-nbd while two reactors keep verified IO
/// going; nothing may fail and the image must end up equal to the model.
fn exercise(name: &str, listen: impl Fn(&Path) -> Listen) {
    let dir = common::temp_dir(name);
    let img = image(&dir);
    let listen = listen(&dir);
    let mut server = QemuNbd::start(&img, listen.clone(), false);
    let reg = BackendRegistry::with_builtin();
    let params = json!({"address": listen.address(), "export": "disk0", "reconnect_timeout_ms": 20000, "max_inflight": 64});
    let bdev = reg
        .create("nbd", "n0", &params, false)
        .expect("create nbd bdev");
    assert_eq!(bdev.info().size(), SIZE);
    assert!(!bdev.info().read_only);
    let set = ReactorSet::spawn_threads(2, ReactorOptions::polite()).unwrap();
    let c0 = Arc::new(BdevClient::open(&set.handle(0).unwrap(), &bdev).unwrap());
    let c1 = BdevClient::open(&set.handle(1).unwrap(), &bdev).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    verify_patterns(&c0, &mut model, 31, 10, 32, 128, true).expect("integrity");
    assert_eq!(compare(&c1, &model).unwrap(), SIZE);

    // Kill and restart under load. The writer thread runs batches until told to stop; each batch
    // waits for every reply, so a failed or lost request fails the test.
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (c0.clone(), stop.clone());
    // The writer owns all but the last MiB; the held writes below go to the last MiB.
    let span = (SIZE - (1 << 20)) as usize;
    let mut m = model[..span].to_vec();
    let writer = std::thread::spawn(move || {
        let mut seed = 100;
        let mut batches = 0u32;
        while !s.load(Ordering::Relaxed) {
            if let Err(e) = verify_patterns(&c, &mut m, seed, 4, 32, 64, true) {
                return Err(format!("after {batches} batches: {e}"));
            }
            seed += 1;
            batches += 1;
        }
        Ok((m, batches))
    });
    for cycle in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        server.kill();
        // Requests issued while the server is down are held, not failed.
        let held = c1.submit(Op::Write {
            offset: span as u64 + 4096 * cycle,
            data: vec![0xc0 + cycle as u8; 4096],
        });
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            held.try_recv().is_err(),
            "a request completed while the server was down"
        );
        server.spawn();
        let (st, _) = held
            .recv_timeout(Duration::from_secs(20))
            .expect("held request completed after restart");
        assert_eq!(st, IoStatus::Success);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (m, batches) = writer
        .join()
        .unwrap()
        .expect("no IO failed across restarts");
    assert!(
        batches >= 3,
        "writer made too little progress: {batches} batches"
    );
    model[..span].copy_from_slice(&m);
    for cycle in 0..3usize {
        let off = span + 4096 * cycle;
        model[off..off + 4096].fill(0xc0 + cycle as u8);
    }
    assert_eq!(compare(&c0, &model).unwrap(), SIZE);
    assert_eq!(c0.status(Op::Flush), IoStatus::Success);
    let s = bdev.iostat();
    assert_eq!(s.io_error.total(), 0, "{s:?}");
    drop(c0);
    drop(c1);
    drop(set);
    server.kill();
    // Written through the server to the image file: byte-exact.
    assert!(
        std::fs::read(&img).unwrap() == model,
        "image content differs from the model"
    );

    // Read-only export: writes fail with ReadOnly, reads work.
    let mut ro_server = QemuNbd::start(&img, listen.clone(), true);
    let ro = reg.create("nbd", "ro", &params, false).unwrap();
    assert!(ro.info().read_only);
    let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
    let c = BdevClient::open(&set.handle(0).unwrap(), &ro).unwrap();
    assert_eq!(c.write(0, &[1; 512]), IoStatus::ReadOnly);
    assert_eq!(c.read(0, 4096).unwrap(), model[..4096].to_vec());
    assert_eq!(ro.iostat().io_error.read_only, 1);
    drop(c);
    drop(set);
    ro_server.kill();

    // Unreachable server: creating the bdev fails with a message naming the address.
    let e = reg
        .create("nbd", "gone", &params, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nbd") && e.contains(&listen.address().replace("127.0.0.1:", "tcp:127.0.0.1:"))
            || e.contains(&listen.address()),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nbd_over_unix_socket() {
    exercise("nbd-unix", |d| Listen::Unix(d.join("nbd.sock")));
}

#[test]
fn nbd_over_tcp_loopback() {
    exercise("nbd-tcp", |_| Listen::Tcp(free_port()));
}

#[test]
fn held_requests_fail_after_the_reconnect_timeout() {
    let dir = common::temp_dir("nbd-timeout");
    let img = image(&dir);
    let sock = dir.join("t.sock");
    let mut server = QemuNbd::start(&img, Listen::Unix(sock.clone()), false);
    let b = BackendRegistry::with_builtin()
        .create("nbd", "t", &json!({"address": format!("unix:{}", sock.display()), "export": "disk0", "reconnect_timeout_ms": 500}), false)
        .unwrap();
    let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
    let c = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
    assert_eq!(c.write(0, &[7; 512]), IoStatus::Success);
    server.kill();
    let t0 = Instant::now();
    assert_eq!(c.read(0, 512), Err(IoStatus::IoError(libc::ENOTCONN)));
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "failed before the timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(b.iostat().io_error.io_error, 1);
    // Back again: IO works again without recreating anything.
    server.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.read(0, 512) {
            Ok(d) => {
                assert_eq!(d, vec![7; 512]);
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no recovery: {e:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
