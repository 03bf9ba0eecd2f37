//! A throw-away one-node Ceph cluster on 127.0.0.1 for tests (one monitor, one memstore OSD, auth
//! off, pool `rbd` of size 1, no manager), driven through `tests/ceph/start-cluster`. The daemons
//! are this process's children: stopping kills exactly them, by pid, and reaps them (< 1 s).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PACKAGES: [&str; 5] = [
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    "librbd-dev",
    "librados-dev",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/start-cluster")
}

fn have_ceph() -> bool {
    ["ceph-mon", "ceph-osd", "rados", "rbd", "monmaptool"]
        .iter()
        .all(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Installs the Ceph packages if missing (as root, like scripts/install-deps). False if they
/// are still missing afterwards.
fn ensure_packages() -> bool {
    if have_ceph() {
        return true;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
    have_ceph()
}

fn free_port_block() -> u16 {
    // A free port with 20 more above it for the OSD (they are checked by the OSD's own bind).
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        if p < 65000 {
            return p;
        }
    }
}

/// A running cluster. Dropping it kills its daemons and removes its directory.
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub mon_port: u16,
    mon: Option<Child>,
    osd: Option<Child>,
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(script())
        .args(args)
        .output()
        .expect("run tests/ceph/start-cluster");
    assert!(
        out.status.success(),
        "start-cluster {args:?} failed: {}{}\n(logs in {})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dir.join("log").display()
    );
}

impl Cluster {
    /// Starts a cluster in a fresh temp dir, or returns None after printing "skipped: ..." when
    /// the Ceph packages are missing and cannot be installed.
    pub fn start(name: &str) -> Option<Cluster> {
        if !ensure_packages() {
            println!(
                "skipped: Ceph packages not installed and not installable ({})",
                PACKAGES.join(" ")
            );
            return None;
        }
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(format!("hp-ceph-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mon_port = free_port_block();
        let d = dir.to_str().expect("utf-8 temp dir");
        run(&dir, &["setup", d, &mon_port.to_string()]);
        let mut c = Cluster {
            conf: dir.join("ceph.conf"),
            dir: dir.clone(),
            mon_port,
            mon: None,
            osd: None,
        };
        c.mon = Some(c.spawn("mon"));
        run(&dir, &["osd-mkfs", d]);
        c.osd = Some(c.spawn("osd"));
        run(&dir, &["pool", d, "rbd"]);
        println!(
            "ceph: one-node cluster up in {:.1} s (mon 127.0.0.1:{mon_port}, {})",
            t0.elapsed().as_secs_f64(),
            dir.display()
        );
        Some(c)
    }

    fn spawn(&self, what: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("log/{what}.out"))).expect("log");
        Command::new(script())
            .args([what, self.dir.to_str().unwrap_or_default()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a ceph daemon")
    }

    /// The monitor address as librados takes it.
    pub fn mon_host(&self) -> String {
        format!("[v2:127.0.0.1:{}]", self.mon_port)
    }

    /// Runs a Ceph CLI (`rbd`, `rados`, `ceph`) against this cluster; panics on failure.
    pub fn cli(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(tool)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run a ceph CLI");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Stops the OSD cleanly (SIGTERM: memstore saves its data) and waits for it to exit.
    pub fn stop_osd(&mut self) {
        if let Some(mut c) = self.osd.take() {
            // SAFETY: kill() on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the OSD again (its data comes back from the memstore save).
    pub fn start_osd(&mut self) {
        assert!(self.osd.is_none(), "OSD already running");
        self.osd = Some(self.spawn("osd"));
    }

    /// Kills both daemons (SIGKILL, by pid) and reaps them. Returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let t0 = Instant::now();
        for c in [self.osd.take(), self.mon.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        t0.elapsed()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
