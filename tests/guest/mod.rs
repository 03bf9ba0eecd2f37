//! QEMU guest harness for vhost-user-blk tests.
//!
//! A small Linux guest (Debian cloud kernel, busybox, fio) boots under TCG with one
//! `vhost-user-blk-pci` disk per socket, runs a shell job and powers off. The job reports back
//! over the guest's second serial port, which carries nothing but results:
//! - `HP-RESULT key=value` lines (`hp-result KEY VALUE...` in the guest),
//! - blobs between `HP-BLOB-BEGIN name` and `HP-BLOB-END name` (`hp-blob NAME FILE`),
//! - `HP-READY` once the disks are up (boot time is measured to it) and `HP-DONE` after the job.
//!
//! Guest-side helpers: `hp-run NAME CMD...` (reports `NAME.rc` and blobs `NAME.stdout`,
//! `NAME.stderr`), `hp-diskinfo vda` (`vda.size`, `vda.serial`, `vda.ro`, `vda.queues`). The
//! [`job`] functions write those calls for you.
//!
//! Usage, from an integration test (`#[path = "guest/mod.rs"] mod guest;`):
//! ```ignore
//! let images = match guest::images() { Ok(i) => i, Err(e) => return println!("skipped: {e}") };
//! let mut g = Guest::launch(&images, GuestConfig { vhost_sockets: vec![sock], job, ..Default::default() })?;
//! g.wait_for_result("fio.started", Duration::from_secs(30))?; // optional: act on the host mid-job
//! let out = g.wait()?;
//! out.fio("fio.v")?.assert_clean();
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Kernel and base initramfs built (or found in the cache) by `tests/guest/build-initramfs`.
#[derive(Clone, Debug)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest cannot run on this machine (no QEMU, no way to download the kernel): skip.
    #[error("{0}")]
    Unavailable(String),
    #[error("guest image build failed: {0}")]
    Build(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}\n--- console (tail) ---\n{console}")]
    Timeout {
        what: String,
        after: Duration,
        console: String,
    },
    #[error("QEMU exited ({status}) before {what}\n--- qemu stderr ---\n{stderr}\n--- console (tail) ---\n{console}")]
    Exited {
        what: String,
        status: ExitStatus,
        stderr: String,
        console: String,
    },
    #[error("missing result {0}")]
    Missing(String),
    #[error("bad fio output for {name}: {why}")]
    Fio { name: String, why: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

/// Builds the guest images once per test process. `Err(Unavailable)` means "skip this test".
pub fn images() -> Result<GuestImages, GuestError> {
    // Built once per test process; errors are kept as (skip?, message): io::Error is not Clone.
    static IMAGES: OnceLock<Result<GuestImages, (bool, String)>> = OnceLock::new();
    let cached = IMAGES.get_or_init(|| {
        build_images().map_err(|e| (matches!(e, GuestError::Unavailable(_)), e.to_string()))
    });
    match cached {
        Ok(i) => Ok(i.clone()),
        Err((true, m)) => Err(GuestError::Unavailable(m.clone())),
        Err((false, m)) => Err(GuestError::Build(m.clone())),
    }
}

fn build_images() -> Result<GuestImages, GuestError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-initramfs");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("run {}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprint!("{stderr}");
    match out.status.code() {
        Some(0) => {}
        Some(2) => {
            let why = stderr
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("build-initramfs: unavailable: "))
                .unwrap_or("guest images unavailable");
            return Err(GuestError::Unavailable(why.to_string()));
        }
        _ => return Err(GuestError::Build(format!("{}: {stderr}", out.status))),
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .ok_or_else(|| GuestError::Build(format!("no {k} in script output: {stdout}")))
    };
    Ok(GuestImages {
        kernel: field("KERNEL=")?,
        initrd: field("INITRD=")?,
    })
}

/// Whether a program is on PATH (for skip decisions on host tools such as qemu-storage-daemon).
pub fn have_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// What to boot and what to run in it.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// One vhost-user-blk disk per socket: vda, vdb, ... in this order.
    pub vhost_sockets: Vec<PathBuf>,
    /// `num-queues` of every disk. The guest uses at most one queue per vCPU: keep `smp` ≥ this.
    pub num_queues: u16,
    pub mem_mb: u32,
    pub smp: u32,
    /// Shell script (busybox ash) run as /job.sh once the disks are up; see [`job`].
    pub job: String,
    /// Extra files for the job, by absolute guest path (e.g. `/pattern.bin`).
    pub files: Vec<(String, Vec<u8>)>,
    /// Whole-run limit: [`Guest::wait`] kills QEMU after it.
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// Appended to QEMU's command line (e.g. a `-qmp` socket).
    pub qemu_args: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            vhost_sockets: Vec::new(),
            num_queues: 1,
            mem_mb: 512,
            smp: 1,
            job: String::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(90),
            kernel_args: String::new(),
            qemu_args: Vec::new(),
        }
    }
}

/// A running QEMU guest. Dropping it kills QEMU and removes its files (set `HP_GUEST_KEEP=1` to
/// keep them).
pub struct Guest {
    /// Held for the guest's lifetime: TCG guests are CPU bound, so tests in one binary run their
    /// guests one at a time (cargo runs test binaries one after another).
    _slot: MutexGuard<'static, ()>,
    child: Option<Child>,
    status: Option<ExitStatus>,
    dir: PathBuf,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    ready_at: Option<Duration>,
}

/// How often the host looks at the result channel and at QEMU.
const POLL: Duration = Duration::from_millis(50);

impl Guest {
    /// Starts QEMU and returns at once; the guest boots and runs its job in the background.
    pub fn launch(images: &GuestImages, cfg: GuestConfig) -> Result<Guest, GuestError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        static SLOT: Mutex<()> = Mutex::new(());
        // A test that panicked while holding the slot has already dropped its guest.
        let slot = SLOT.lock().unwrap_or_else(|p| p.into_inner());
        let dir = std::env::temp_dir().join(format!(
            "hp-guest-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;

        // QEMU (x86) takes one -initrd: the base archive, zero padding to a 4-byte boundary
        // (the kernel looks for the next archive's magic only there), then this job's archive.
        let initrd = dir.join("initrd");
        {
            let mut f = fs::File::create(&initrd).map_err(io_err("create initrd"))?;
            let mut base = fs::File::open(&images.initrd).map_err(io_err("open base initrd"))?;
            let n = std::io::copy(&mut base, &mut f).map_err(io_err("copy base initrd"))?;
            let pad = (4 - n % 4) % 4;
            let mut files = vec![("/job.sh".to_string(), cfg.job.clone().into_bytes())];
            files.extend(cfg.files.iter().cloned());
            let mut tail = vec![0u8; pad as usize];
            tail.extend(cpio_newc(&files));
            f.write_all(&tail).map_err(io_err("write job archive"))?;
        }

        let mem = format!("{}M", cfg.mem_mb);
        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35,accel=tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            mem.clone(),
            "-smp".into(),
            // maxcpus of at least 2, even with one vCPU online: TCG translates the guest's memory
            // barriers into host barriers only when more than one vCPU may run (QEMU sets
            // CF_PARALLEL from max_cpus). Without them the guest's virtio handshake with a
            // backend in another process (publish used idx / read used_event against write
            // used_event / read used idx) can lose an interrupt, and fio then waits forever:
            // hot_upgrade's guest hung so after a handover in 2 of 3 runs.
            format!("{},maxcpus={}", cfg.smp, cfg.smp.max(2)),
            // vhost-user maps guest RAM in the backend: it must be a shareable fd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=con,path={}", dir.join("console.log").display()),
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            format!("file,id=res,path={}", dir.join("results.log").display()),
            "-serial".into(),
            "chardev:res".into(),
            "-kernel".into(),
            images.kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            format!(
                "console=ttyS0 quiet panic=-1 hp.disks={} {}",
                cfg.vhost_sockets.len(),
                cfg.kernel_args
            ),
        ];
        for (i, sock) in cfg.vhost_sockets.iter().enumerate() {
            args.push("-chardev".into());
            // reconnect=1: QEMU redials a restarted backend (in whole seconds).
            args.push(format!(
                "socket,id=vu{i},path={},reconnect=1",
                sock.display()
            ));
            args.push("-device".into());
            args.push(format!(
                "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                cfg.num_queues
            ));
        }
        args.extend(cfg.qemu_args.iter().cloned());
        fs::write(dir.join("qemu.cmdline"), args.join(" ")).map_err(io_err("write cmdline"))?;

        let stderr = fs::File::create(dir.join("qemu.stderr")).map_err(io_err("create stderr"))?;
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io_err("spawn qemu-system-x86_64"))?;
        Ok(Guest {
            _slot: slot,
            child: Some(child),
            status: None,
            dir,
            started,
            deadline: started + cfg.timeout,
            timeout: cfg.timeout,
            ready_at: None,
        })
    }

    /// The guest's own files: console.log, results.log, qemu.stderr, qemu.cmdline, initrd.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything the guest printed on its console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir.join("console.log"))
    }

    /// Results and blobs reported so far.
    pub fn report(&self) -> Report {
        Report::parse(&read_lossy(&self.dir.join("results.log")))
    }

    /// Time from launch until the guest reported its disks up, if seen yet.
    pub fn boot_time(&self) -> Option<Duration> {
        self.ready_at
    }

    /// Waits until the guest's disks are up; returns the boot time.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, GuestError> {
        self.poll_until("HP-READY", timeout, |r| r.ready.then_some(()))?;
        Ok(self.ready_at.unwrap_or_default())
    }

    /// Waits until the guest reports `key` (e.g. a job's "started" mark) and returns its value.
    /// Lets a test act on the host (restart the backend, ...) while the guest job runs.
    pub fn wait_for_result(&mut self, key: &str, timeout: Duration) -> Result<String, GuestError> {
        self.poll_until(&format!("result {key}"), timeout, |r| {
            r.get(key).map(str::to_string)
        })
    }

    /// Waits for the guest to power off (at most until the launch timeout) and returns what it
    /// reported. On timeout QEMU is killed and the error holds the console's tail.
    pub fn wait(mut self) -> Result<GuestOutput, GuestError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.poll_until("guest power-off", left, |_| None::<()>) {
            Err(GuestError::Exited { status, .. }) if status.success() => {}
            Err(e) => return Err(e),
            Ok(()) => {} // the predicate never matches
        }
        let report = self.report();
        if !report.done {
            // /init died or the kernel panicked (-no-reboot turns that into a clean exit).
            return Err(GuestError::Exited {
                what: "the job finished (no HP-DONE)".into(),
                status: self.status.unwrap_or_default(),
                stderr: read_lossy(&self.dir.join("qemu.stderr")),
                console: tail(&self.console(), 60),
            });
        }
        Ok(GuestOutput {
            report,
            console: self.console(),
            boot_time: self.ready_at,
            run_time: self.started.elapsed(),
        })
    }

    /// Kills QEMU now (the guest sees its power cut).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// Polls the result channel and QEMU until `found` returns something, QEMU exits, the
    /// timeout passes or the launch deadline passes. A clean QEMU exit (status 0) before `found`
    /// is reported as `Exited` with a success status.
    fn poll_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut found: impl FnMut(&Report) -> Option<T>,
    ) -> Result<T, GuestError> {
        let until = (Instant::now() + timeout).min(self.deadline);
        loop {
            // Check exit first, then read: nothing can arrive after the exit was seen.
            let status = self.try_status()?;
            let report = self.report();
            if report.ready && self.ready_at.is_none() {
                self.ready_at = Some(self.started.elapsed());
            }
            if let Some(v) = found(&report) {
                return Ok(v);
            }
            if let Some(status) = status {
                return Err(GuestError::Exited {
                    what: what.to_string(),
                    status,
                    stderr: read_lossy(&self.dir.join("qemu.stderr")),
                    console: tail(&self.console(), 60),
                });
            }
            if Instant::now() >= until {
                let after = if until == self.deadline {
                    self.timeout
                } else {
                    timeout
                };
                self.kill();
                return Err(GuestError::Timeout {
                    what: what.to_string(),
                    after,
                    console: tail(&self.console(), 60),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn try_status(&mut self) -> Result<Option<ExitStatus>, GuestError> {
        if let Some(c) = self.child.as_mut() {
            if let Some(s) = c.try_wait().map_err(io_err("wait for qemu"))? {
                self.status = Some(s);
                self.child = None;
            }
        }
        Ok(self.status)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("HP_GUEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("guest files kept in {}", self.dir.display());
        }
    }
}

/// What the guest reported on its result channel.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `HP-RESULT` lines in order (a key may repeat).
    pub results: Vec<(String, String)>,
    pub blobs: BTreeMap<String, String>,
    /// The disks were up and the job about to start.
    pub ready: bool,
    /// The job finished (the guest powers off next).
    pub done: bool,
}

impl Report {
    /// Parses the result channel's text.
    pub fn parse(text: &str) -> Report {
        let mut r = Report::default();
        let mut blob: Option<(String, String)> = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some((name, body)) = blob.as_mut() {
                if line.strip_prefix("HP-BLOB-END ") == Some(name.as_str()) {
                    // hp-blob adds a newline so the end marker starts a line.
                    let body = body.strip_suffix('\n').unwrap_or(body).to_string();
                    r.blobs.insert(name.clone(), body);
                    blob = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            } else if let Some(kv) = line.strip_prefix("HP-RESULT ") {
                if let Some((k, v)) = kv.split_once('=') {
                    r.results.push((k.to_string(), v.to_string()));
                }
            } else if let Some(name) = line.strip_prefix("HP-BLOB-BEGIN ") {
                blob = Some((name.to_string(), String::new()));
            } else if line == "HP-READY" {
                r.ready = true;
            } else if line == "HP-DONE" {
                r.done = true;
            }
        }
        r
    }

    /// The last value reported for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Like [`get`](Self::get), but a missing key is an error.
    pub fn require(&self, key: &str) -> Result<&str, GuestError> {
        self.get(key)
            .ok_or_else(|| GuestError::Missing(key.to_string()))
    }

    /// Parses `key` as an integer.
    pub fn int(&self, key: &str) -> Result<i64, GuestError> {
        let v = self.require(key)?;
        v.trim()
            .parse()
            .map_err(|_| GuestError::Missing(format!("{key} (not an integer: {v:?})")))
    }

    /// What `hp-diskinfo DEV` reported.
    pub fn disk(&self, dev: &str) -> Result<DiskInfo, GuestError> {
        Ok(DiskInfo {
            sectors: self.int(&format!("{dev}.size"))? as u64,
            serial: self.require(&format!("{dev}.serial"))?.to_string(),
            read_only: self.int(&format!("{dev}.ro"))? != 0,
            queues: self.int(&format!("{dev}.queues"))? as u32,
        })
    }

    /// The fio run reported by `job::fio(name, ..)`.
    pub fn fio(&self, name: &str) -> Result<FioReport, GuestError> {
        let bad = |why: String| GuestError::Fio {
            name: name.to_string(),
            why,
        };
        let rc = self.int(&format!("{name}.rc"))?;
        let stdout = self
            .blobs
            .get(&format!("{name}.stdout"))
            .cloned()
            .unwrap_or_default();
        let stderr = self
            .blobs
            .get(&format!("{name}.stderr"))
            .cloned()
            .unwrap_or_default();
        // fio may print warnings before the JSON document.
        let start = stdout
            .find('{')
            .ok_or_else(|| bad(format!("no JSON (rc {rc}): {stderr}")))?;
        let json: serde_json::Value = serde_json::Deserializer::from_str(&stdout[start..])
            .into_iter()
            .next()
            .ok_or_else(|| bad("empty JSON".into()))?
            .map_err(|e| bad(format!("{e}; stderr: {stderr}")))?;
        let jobs = json["jobs"]
            .as_array()
            .ok_or_else(|| bad("no jobs".into()))?;
        let jobs = jobs
            .iter()
            .map(|j| FioJob {
                name: j["jobname"].as_str().unwrap_or("").to_string(),
                error: j["error"].as_i64().unwrap_or(-1),
                total_err: j["total_err"].as_u64().unwrap_or(0),
                read_bytes: j["read"]["io_bytes"].as_u64().unwrap_or(0),
                write_bytes: j["write"]["io_bytes"].as_u64().unwrap_or(0),
                read_ios: j["read"]["total_ios"].as_u64().unwrap_or(0),
                write_ios: j["write"]["total_ios"].as_u64().unwrap_or(0),
                max_lat: Duration::from_nanos(
                    ["read", "write", "trim"]
                        .iter()
                        .filter_map(|d| j[d]["lat_ns"]["max"].as_u64())
                        .max()
                        .unwrap_or(0),
                ),
            })
            .collect();
        Ok(FioReport {
            name: name.to_string(),
            rc,
            jobs,
            stderr,
            json,
        })
    }
}

/// A finished guest run.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    pub report: Report,
    /// The whole serial console (kernel messages and the job's own output).
    pub console: String,
    /// Launch → disks up, as seen by the host.
    pub boot_time: Option<Duration>,
    /// Launch → QEMU exit.
    pub run_time: Duration,
}

impl std::ops::Deref for GuestOutput {
    type Target = Report;
    fn deref(&self) -> &Report {
        &self.report
    }
}

/// A virtio-blk disk as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors (`/sys/block/DEV/size`).
    pub sectors: u64,
    /// `/sys/block/DEV/serial` (VIRTIO_BLK_T_GET_ID), or "ERR" if reading it failed.
    pub serial: String,
    pub read_only: bool,
    /// blk-mq hardware queues the guest driver set up.
    pub queues: u32,
}

/// One fio run.
#[derive(Clone, Debug)]
pub struct FioReport {
    pub name: String,
    pub rc: i64,
    pub jobs: Vec<FioJob>,
    pub stderr: String,
    pub json: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    /// fio's per-job error (errno; 84 = EILSEQ for a verify failure).
    pub error: i64,
    /// Errors counted under `continue_on_error`.
    pub total_err: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
    /// Longest completion latency of any IO: the guest-visible stall of a backend restart.
    pub max_lat: Duration,
}

impl FioReport {
    /// Failed jobs plus errors counted under continue_on_error; a non-zero exit counts as one.
    pub fn errors(&self) -> u64 {
        let jobs: u64 = self
            .jobs
            .iter()
            .map(|j| (j.error != 0) as u64 + j.total_err)
            .sum();
        jobs + (self.rc != 0 && jobs == 0) as u64
    }

    pub fn write_bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.write_bytes).sum()
    }

    pub fn read_bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.read_bytes).sum()
    }

    /// Longest IO latency over all jobs.
    pub fn max_lat(&self) -> Duration {
        self.jobs
            .iter()
            .map(|j| j.max_lat)
            .max()
            .unwrap_or_default()
    }

    /// Panics, with fio's stderr, unless the run had no errors and did some IO.
    pub fn assert_clean(&self) {
        assert!(
            self.errors() == 0 && !self.jobs.is_empty(),
            "fio {}: rc {}, jobs {:?}\nstderr:\n{}",
            self.name,
            self.rc,
            self.jobs,
            self.stderr
        );
        assert!(
            self.write_bytes() + self.read_bytes() > 0,
            "fio {} did no IO",
            self.name
        );
    }
}

/// Shell snippets for [`GuestConfig::job`]. Each ends with a newline; concatenate them.
pub mod job {
    /// Quotes a string for the guest shell.
    pub fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', r"'\''"))
    }

    /// Reports `key` with the value of a shell expression (e.g. `"$(cat /sys/...)"`).
    pub fn result(key: &str, shell_value: &str) -> String {
        format!("hp-result {key} {shell_value}\n")
    }

    /// Reports `key=1`: a mark a host-side [`Guest::wait_for_result`](super::Guest) can wait for.
    pub fn mark(key: &str) -> String {
        format!("hp-result {key} 1\n")
    }

    /// Reports `DEV.size`, `DEV.serial`, `DEV.ro`, `DEV.queues`; read with `Report::disk`.
    pub fn disk_info(dev: &str) -> String {
        format!("hp-diskinfo {dev}\n")
    }

    /// Runs a shell command line; reports `NAME.rc` and blobs `NAME.stdout` / `NAME.stderr`.
    pub fn run(name: &str, command: &str) -> String {
        format!("hp-run {name} {command}\n")
    }

    /// Runs fio with JSON output; read with `Report::fio(name)`. `args` are fio's own
    /// (`--name=... --filename=/dev/vda ...`), without `--output-format`.
    pub fn fio(name: &str, args: &str) -> String {
        run(name, &format!("fio --output-format=json {args}"))
    }

    /// Like [`fio`] but in the background, so the script can go on (mark, wait, ...);
    /// finish with [`wait_background`].
    pub fn fio_background(name: &str, args: &str) -> String {
        format!("hp-run {name} fio --output-format=json {args} &\n")
    }

    /// Waits for every background command.
    pub fn wait_background() -> String {
        "wait\n".to_string()
    }

    /// Writes a guest file (from [`GuestConfig::files`](super::GuestConfig)) to `dev` at
    /// `offset` bytes with O_DIRECT and fsync; reports `NAME.rc`.
    pub fn write_file_at(name: &str, file: &str, dev: &str, offset: u64) -> String {
        assert_eq!(
            offset % 4096,
            0,
            "offset must be 4 KiB aligned for O_DIRECT"
        );
        run(
            name,
            &format!(
                "dd if={file} of=/dev/{dev} bs=4096 seek={} oflag=direct conv=fsync,notrunc",
                offset / 4096
            ),
        )
    }
}

/// A newc cpio archive of regular files (paths are absolute guest paths, parents created).
fn cpio_newc(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut dirs: Vec<String> = Vec::new();
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        ino += 1;
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    for (path, data) in files {
        let rel = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in rel
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
                entry(&mut out, &parent, 0o040755, &[]);
            }
        }
        entry(&mut out, rel, 0o100755, data);
    }
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl fmt::Display for DiskInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sectors, serial {:?}, {}, {} queue(s)",
            self.sectors,
            self.serial,
            if self.read_only { "ro" } else { "rw" },
            self.queues
        )
    }
}
