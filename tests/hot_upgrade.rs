//! Process hot upgrade of `hostplane run` under a QEMU 7.2 guest (TCG) running fio crc32c verify
//! on a vhost-user-blk disk backed by a file bdev:
//!
//! 1. Handover, `HP_UPGRADES` times (default 10): a new `hostplane run --takeover` takes the
//!    vhost-user connection, guest memory, rings and RPC socket from the running one, which exits.
//!    QEMU sees no disconnect. Printed per upgrade: the IO pause measured by the new process
//!    (old pauses → new resumes); per phase: fio's max latency, the worst guest-visible stall.
//! 2. Crash, `HP_KILLS` times (default 5): `kill -9` mid-IO, restart from the same config, QEMU
//!    reconnects (reconnect=1) and the inflight region is replayed. Printed per crash: kill →
//!    rings restarted in the new process (seen over RPC); fio's max latency for the phase.
//!
//! Both phases: 0 fio errors, verify passes.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use guest::{job, Guest, GuestConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const DISK_MIB: u64 = 64;

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One `hostplane run` process generation.
struct Hp {
    child: Child,
    log: PathBuf,
}

impl Hp {
    fn spawn(dir: &Path, config: &Path, rpc: &Path, gen: usize, takeover: bool) -> Hp {
        Hp::spawn_env(dir, config, rpc, gen, takeover, &[])
    }

    fn spawn_env(
        dir: &Path,
        config: &Path,
        rpc: &Path,
        gen: usize,
        takeover: bool,
        env: &[(&str, &str)],
    ) -> Hp {
        let log = dir.join(format!("hostplane-{gen}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostplane"));
        cmd.args(["run", "-l", "0-1", "--stats-interval", "0", "--config"])
            .arg(config)
            .arg("-r")
            .arg(rpc)
            .arg("--vhost-dir")
            .arg(dir);
        if takeover {
            let mut h = rpc.as_os_str().to_owned();
            h.push(".handover");
            cmd.arg("--takeover").arg(h);
        }
        // Two processes live at once during a handover: each its own EAL file prefix.
        cmd.arg("--")
            .arg("--file-prefix")
            .arg(format!("hp-up-{}-{gen}", std::process::id()))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        Hp {
            child: cmd.spawn().expect("spawn hostplane"),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Hp {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One JSON-RPC call straight on the socket (no `hostplane rpc` process start in the timing).
fn call(sock: &Path, method: &str, params: Value) -> Result<Value, String> {
    common::rpc_call(sock, method, params).map_err(|e| format!("{method}: {e}"))
}

/// `vhost_get_controllers`.
fn controllers(sock: &Path) -> Result<Value, String> {
    call(sock, "vhost_get_controllers", json!({}))
}

/// Whether the controller has a front-end with started rings (from `vhost_get_controllers`).
fn rings_started(sock: &Path) -> bool {
    controllers(sock).is_ok_and(|v| {
        v[0]["sessions"][0]["started"].as_bool() == Some(true)
            && v[0]["stats"]["connections"].as_u64().unwrap_or(0) > 0
    })
}

/// `DIR/hostplane.toml` with test EAL args (no file prefix: each process gets its own on the
/// command line) and one VM disk `vm1/root` of `system` with `params` (TOML inline table),
/// served by vhost controller `vm1-root`.
fn one_disk_config(dir: &Path, name: &str, system: &str, params: &str) -> PathBuf {
    let mut eal = Vec::new();
    let mut it = common::eal_test_args(name).into_iter();
    while let Some(a) = it.next() {
        if a == "--file-prefix" {
            it.next();
        } else {
            eal.push(a);
        }
    }
    let config = dir.join("hostplane.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[eal]
args = {eal:?}

[[vm]]
name = "vm1"
[[vm.disk]]
name = "root"
system = "{system}"
params = {params}
vhost = "vm1-root"
"#
        ),
    )
    .unwrap();
    config
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

#[test]
fn qemu_guest_fio_verify_across_handovers_and_crashes() {
    let images = match guest::images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let upgrades = env_n("HP_UPGRADES", 20);
    let kills = env_n("HP_KILLS", 20);
    let dir = std::env::temp_dir().join(format!("hp-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = one_disk_config(
        &dir,
        "upgrade",
        "file",
        &format!(
            r#"{{ path = "{}", size_mib = {DISK_MIB} }}"#,
            dir.join("vm1-root.img").display()
        ),
    );
    let rpc_sock = common::rpc_socket("upgrade");
    let vhost_sock = dir.join("vm1-root");
    let mut gen = 0;
    let mut hp = Hp::spawn(&dir, &config, &rpc_sock, gen, false);
    wait_for("hostplane up", Duration::from_secs(60), || {
        controllers(&rpc_sock).is_ok()
    });

    let fio = |name: &str, runtime: usize| {
        job::fio(
            name,
            &format!(
                "--name=v --filename=/dev/vda --ioengine=libaio --iodepth=16 --direct=1 \
                 --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 --size=16M \
                 --loops=100000 --runtime={runtime}"
            ),
        )
    };
    let ta = upgrades * 3 + 6;
    let tb = kills * 5 + 6;
    let script = [
        job::mark("a.started"),
        fio("fio.a", ta),
        job::mark("b.started"),
        fio("fio.b", tb),
    ]
    .concat();
    let mut g = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![vhost_sock.clone()],
            num_queues: 1,
            smp: 1,
            job: script,
            timeout: Duration::from_secs((ta + tb + 600) as u64),
            ..Default::default()
        },
    )
    .expect("launch guest");
    g.wait_for_result("a.started", Duration::from_secs(90))
        .expect("fio a start");

    // 0. Rollback: a new binary that fails to start, and one that fails its first health check,
    // leave the old process serving (the guest's fio verify at the end covers its IO).
    let bad_config = dir.join("broken.toml");
    std::fs::write(&bad_config, "[[vm]]\nname = \"vm1\"\nbogus_field = 1\n").unwrap();
    for (what, cfg, env) in [
        ("fails to start (bad config)", &bad_config, None),
        (
            "fails its first health check",
            &config,
            Some(("HOSTPLANE_HANDOVER_FAULT", "health-check")),
        ),
    ] {
        gen += 1;
        let t0 = Instant::now();
        let mut new = Hp::spawn_env(&dir, cfg, &rpc_sock, gen, true, env.as_slice());
        let status = loop {
            if let Some(s) = new.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what}: new process still running:\n{}",
                new.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !status.success(),
            "{what}: the new process should fail:\n{}",
            new.log_text()
        );
        assert!(
            hp.child.try_wait().unwrap().is_none(),
            "{what}: the old process exited:\n{}",
            hp.log_text()
        );
        assert!(
            rings_started(&rpc_sock),
            "{what}: old process not serving:\n{}",
            hp.log_text()
        );
        let why = new
            .log_text()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string();
        println!("rollback, new binary {what}: exited {status} after {:?}; old process still serving ({why})", t0.elapsed());
    }

    // 1. Handovers.
    let mut pauses = Vec::new();
    for i in 0..upgrades {
        std::thread::sleep(Duration::from_millis(700));
        gen += 1;
        let t0 = Instant::now();
        let new = Hp::spawn(&dir, &config, &rpc_sock, gen, true);
        let mut old = std::mem::replace(&mut hp, new);
        let status = loop {
            if let Some(s) = old.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "old process did not exit:\n{}\nnew:\n{}",
                old.log_text(),
                hp.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "old process: {status}\n{}",
            old.log_text()
        );
        let log = hp.log_text();
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix("takeover: "))
            .unwrap_or_else(|| panic!("no takeover line in the new process log:\n{log}"))
            .to_string();
        // "... guest IO paused X ms (drain Y ms)"
        let num = |key: &str| -> f64 {
            line.split(key)
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{key} in {line:?}"))
        };
        let (ms, drain) = (num("paused "), num("(drain "));
        assert!(
            !old.log_text().contains("front-end disconnected"),
            "QEMU saw a disconnect"
        );
        println!(
            "upgrade {i}: guest IO paused {ms:.1} ms = drain of IO already at the bdev {drain:.1} ms + handover {:.1} ms (new process started and took over in {:?})",
            ms - drain,
            t0.elapsed()
        );
        pauses.push((ms, drain));
    }
    assert!(rings_started(&rpc_sock), "{}", hp.log_text());
    let v = controllers(&rpc_sock).unwrap();
    assert_eq!(
        v[0]["stats"]["connections"].as_u64(),
        Some(1),
        "one connection all along: {v}"
    );

    // 2. Crashes.
    // fio verifies what it wrote after its runtime; under TCG on a loaded 2-core machine that
    // phase alone has taken over a minute, hence the generous bound.
    g.wait_for_result("b.started", Duration::from_secs((ta + 300) as u64))
        .expect("fio b start");
    let mut restarts = Vec::new();
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(1500));
        let t0 = Instant::now();
        hp.kill9();
        gen += 1;
        hp = Hp::spawn(&dir, &config, &rpc_sock, gen, false);
        let d = wait_for(
            "rings restarted after kill -9",
            Duration::from_secs(60),
            || rings_started(&rpc_sock),
        );
        let v = controllers(&rpc_sock).unwrap();
        let resub = v[0]["stats"]["resubmitted"].as_u64().unwrap_or(0);
        println!(
            "crash {i}: kill -9 → rings restarted in {:?} ({d:?} after spawn), {resub} requests resubmitted from the inflight region",
            t0.elapsed()
        );
        restarts.push(t0.elapsed());
    }

    let out = g.wait().unwrap_or_else(|e| panic!("guest run: {e}"));
    let a = out
        .fio("fio.a")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    let b = out
        .fio("fio.b")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    a.assert_clean();
    b.assert_clean();
    let max = |f: &dyn Fn(&(f64, f64)) -> f64| pauses.iter().map(f).fold(0.0, f64::max);
    let mut totals: Vec<f64> = pauses.iter().map(|p| p.0).collect();
    totals.sort_by(f64::total_cmp);
    let median = totals.get(totals.len() / 2).copied().unwrap_or(0.0);
    let within = totals.iter().filter(|&&t| t <= 50.0).count();
    let handover_max = max(&|p| p.0 - p.1);
    println!(
        "handover x{upgrades}: fio 0 errors, verify ok, wrote {} MiB; guest IO pause median {median:.1} ms, max {:.1} ms, {within}/{upgrades} ≤ 50 ms; without the drain: max {handover_max:.1} ms; fio max IO latency over the phase {:?}",
        a.write_bytes() >> 20,
        max(&|p| p.0),
        a.max_lat()
    );
    println!(
        "kill -9 x{kills}: fio 0 errors, verify ok, wrote {} MiB; restart max {:?}; guest max IO latency {:?}",
        b.write_bytes() >> 20,
        restarts.iter().max().copied().unwrap_or_default(),
        b.max_lat()
    );
    // The drain waits for requests the bdev already has (file IO on a loaded 2-core machine:
    // sometimes hundreds of ms); the handover's own part must stay within the target.
    assert!(
        handover_max <= 50.0,
        "handover (without the drain) took {handover_max} ms, above the 50 ms target"
    );
    drop(hp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Backend upgrade under a guest: the guest's disk is an NBD bdev served by a real `qemu-nbd`;
/// while fio randwrite+crc32c-verify runs in the guest, the server is replaced five times by the
/// restart-in-place procedure (`bdev_pause` → stop qemu-nbd → start a new one on the same image →
/// `bdev_upgrade --address NEW`). fio must see 0 errors and verify; per upgrade the service's
/// pause is printed with what the server's stop + start-up took and the rest ("beyond server",
/// target ≤ 10 ms); the guest-visible bound is fio's max IO latency over the phase.
#[test]
fn qemu_guest_fio_verify_across_nbd_server_upgrades() {
    let images = match guest::images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let cycles = env_n("HP_NBD_UPGRADES", 5);
    let dir = std::env::temp_dir().join(format!("hp-nbd-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("vm1-root.img");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg(format!("{DISK_MIB}M"))
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let mut server = common::nbd::QemuNbd::start(&img, &dir.join("nbd-0.sock"));
    let config = one_disk_config(
        &dir,
        "nbd-upgrade",
        "nbd",
        &format!(
            r#"{{ address = "{}", export = "disk0" }}"#,
            server.address()
        ),
    );
    let rpc_sock = common::rpc_socket("nbd-upgrade");
    let hp = Hp::spawn(&dir, &config, &rpc_sock, 0, false);
    wait_for("hostplane up", Duration::from_secs(60), || {
        controllers(&rpc_sock).is_ok()
    });
    let st = call(&rpc_sock, "bdev_get_service_stats", json!({})).expect("service stats");
    let bdev = st[0]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("no service in {st}\n{}", hp.log_text()))
        .to_string();

    let runtime = cycles * 3 + 8;
    let script = [
        job::mark("a.started"),
        job::fio(
            "fio.a",
            &format!(
                "--name=v --filename=/dev/vda --ioengine=libaio --iodepth=16 --direct=1 \
                 --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 --size=16M \
                 --loops=100000 --runtime={runtime}"
            ),
        ),
    ]
    .concat();
    let mut g = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![dir.join("vm1-root")],
            num_queues: 1,
            smp: 1,
            job: script,
            timeout: Duration::from_secs((runtime + 600) as u64),
            ..Default::default()
        },
    )
    .expect("launch guest");
    g.wait_for_result("a.started", Duration::from_secs(90))
        .expect("fio start");

    let mut beyond = Vec::new();
    for cycle in 1..=cycles {
        std::thread::sleep(Duration::from_secs(2));
        let p = call(
            &rpc_sock,
            "bdev_pause",
            json!({"name": bdev, "drain_timeout_ms": 2000}),
        )
        .unwrap_or_else(|e| panic!("bdev_pause: {e}\n{}", hp.log_text()));
        assert_eq!(p["drained"], true, "{p}");
        let t0 = Instant::now();
        let old = std::mem::replace(
            &mut server,
            common::nbd::QemuNbd::start(&img, &dir.join(format!("nbd-{cycle}.sock"))),
        );
        let stop = old.stop();
        let start = server.startup;
        let server_ms = t0.elapsed().as_secs_f64() * 1e3;
        let u = call(
            &rpc_sock,
            "bdev_upgrade",
            json!({"name": bdev, "address": server.address()}),
        )
        .unwrap_or_else(|e| panic!("bdev_upgrade: {e}\n{}", hp.log_text()));
        assert!(u["errors"].as_array().is_some_and(|e| e.is_empty()), "{u}");
        let st = call(&rpc_sock, "bdev_get_service_stats", json!({"name": bdev})).unwrap();
        let paused = st[0]["paused_ms_last"].as_f64().expect("paused_ms_last");
        println!(
            "nbd upgrade {cycle}: service paused {paused:.1} ms = drain {:.1} ms + server stop {:.1} ms / start {:.1} ms ({server_ms:.1} ms together) + {:.1} ms beyond the server",
            p["waited_ms"].as_f64().unwrap_or(0.0),
            stop.as_secs_f64() * 1e3,
            start.as_secs_f64() * 1e3,
            paused - server_ms
        );
        beyond.push(paused - server_ms);
    }
    let st = call(&rpc_sock, "bdev_get_service_stats", json!({"name": bdev})).unwrap();
    assert_eq!(st[0]["upgrades"].as_u64(), Some(cycles as u64), "{st}");
    let out = g.wait().unwrap_or_else(|e| panic!("guest run: {e}"));
    let a = out
        .fio("fio.a")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    a.assert_clean();
    beyond.sort_by(f64::total_cmp);
    println!(
        "nbd upgrade x{cycles}: fio 0 errors, verify ok, wrote {} MiB; beyond the server: median {:.1} ms, max {:.1} ms (target ≤ 10 ms); guest max IO latency over the phase {:?}",
        a.write_bytes() >> 20,
        beyond[beyond.len() / 2],
        beyond[beyond.len() - 1],
        a.max_lat()
    );
    drop(hp);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
