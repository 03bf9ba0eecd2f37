//! Online conversion through a live `hostplane run` (EAL, one storage reactor on lcore 1, its own
//! RPC socket): `hostplane convert start/status/pause/resume` and `hostplane rpc
//! bdev_convert_status` drive a qcow2 → raw conversion to completion; then `qemu-img compare`
//! passes and the map is gone. One `#[test]`: EAL starts once per process.

mod common;

use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn hostplane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hostplane"))
}

fn sh(cmd: &str, args: &[&str], dir: &Path) {
    let o = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ok(o: Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{what}: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `hostplane convert SUB -s SOCK ARGS...`.
fn convert(sock: &Path, sub: &str, args: &[&str]) -> String {
    let o = hostplane()
        .args(["convert", sub, "-s"])
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    ok(o, &format!("hostplane convert {sub}"))
}

/// `hostplane rpc -s SOCK bdev_convert_status --name NAME`: the conversion's status object.
fn rpc_status(sock: &Path, name: &str) -> Value {
    let o = hostplane()
        .args(["rpc", "-s"])
        .arg(sock)
        .args(["bdev_convert_status", "--name", name])
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(&ok(o, "hostplane rpc")).expect("rpc answer is JSON");
    v["conversions"][0].clone()
}

struct Run(Option<Child>);

/// `hostplane run` on `sock` with `cfg` (and a saved config to replay); returns once it serves.
fn spawn_run(sock: &Path, cfg: &Path, json: Option<&Path>) -> Run {
    let mut cmd = hostplane();
    cmd.args(["run", "--stats-interval", "0", "-r"])
        .arg(sock)
        .arg("--config")
        .arg(cfg);
    if let Some(j) = json {
        cmd.arg("--json").arg(j);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hostplane run");
    let mut run = Run(Some(child));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The socket is bound before EAL starts: wait for an answer, not just the socket.
    while UnixStream::connect(sock).is_err()
        || hostplane()
            .args(["rpc", "-t", "5", "-s"])
            .arg(sock)
            .arg("spdk_get_version")
            .output()
            .map_or(true, |o| !o.status.success())
    {
        if let Some(st) = run.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            let o = run.0.take().unwrap().wait_with_output().unwrap();
            panic!(
                "hostplane exited ({st}) before serving:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(Instant::now() < deadline, "hostplane did not serve in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    run
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

#[test]
fn cli_and_rpc_drive_a_conversion_on_a_running_hostplane() {
    let dir = common::temp_dir("convert-rpc");
    // 64 MiB qcow2 with a backing file, zero clusters and data.
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        &dir,
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 16M",
            "-c",
            "write -P 0x22 40M 8M",
            "base.qcow2",
        ],
        &dir,
    );
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "vm.qcow2",
        ],
        &dir,
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 4M 2M",
            "-c",
            "write -z 41M 1M",
            "-c",
            "write -P 0x44 60M 4M",
            "vm.qcow2",
        ],
        &dir,
    );
    let cfg = dir.join("hp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[eal]\nlcores = \"0-1\"\nargs = {:?}\n\n[storage]\nlcores = \"1\"\n",
            common::eal_test_args("convert-rpc")
        ),
    )
    .unwrap();
    let sock = common::rpc_socket("convert-rpc");
    let mut run = spawn_run(&sock, &cfg, None);

    let src = dir.join("vm.qcow2");
    let target = dir.join("vm.raw");
    // 8 MiB/s: ~8 s for the whole disk, so pause/resume happen mid-way.
    let out = convert(
        &sock,
        "start",
        &[
            "--name",
            "d0",
            "--source",
            src.to_str().unwrap(),
            "--source-format",
            "qcow2",
            "--target",
            target.to_str().unwrap(),
            "--rate-mib",
            "8",
            "--no-wait",
        ],
    );
    assert!(out.contains("\"converting\""), "{out}");
    assert!(dir.join("vm.raw.convmap").exists(), "map created");

    // Progress shows up in `convert status` and `rpc bdev_convert_status`.
    let t = Instant::now();
    loop {
        let st = rpc_status(&sock, "d0");
        if st["grains_done"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(st["state"], "converting", "{st}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no progress: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = convert(&sock, "pause", &["--name", "d0"]);
    assert!(out.contains("\"paused\""), "{out}");
    std::thread::sleep(Duration::from_millis(300)); // copies in flight land
    let a = rpc_status(&sock, "d0");
    std::thread::sleep(Duration::from_millis(700));
    let b = rpc_status(&sock, "d0");
    assert_eq!(a["state"], "paused", "{a}");
    assert_eq!(
        a["grains_done"], b["grains_done"],
        "no progress while paused: {a} {b}"
    );
    assert!(
        b["grains_done"].as_u64().unwrap() < b["grains_total"].as_u64().unwrap(),
        "paused mid-way: {b}"
    );
    let out = convert(&sock, "status", &[]);
    let v: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(v["conversions"][0]["name"], "d0", "{v}");

    // save_config holds the conversion (start + pause); a restart from it resumes it from the
    // map, still paused, where it stopped.
    let o = hostplane()
        .args(["rpc", "-s"])
        .arg(&sock)
        .arg("save_config")
        .output()
        .unwrap();
    let saved_text = ok(o, "save_config");
    let saved: Value = serde_json::from_str(&saved_text).expect("save_config JSON");
    let conv = saved["subsystems"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["subsystem"] == "convert"))
        .unwrap_or_else(|| panic!("no convert subsystem: {saved}"));
    assert_eq!(conv["config"][0]["method"], "bdev_convert_start", "{conv}");
    assert_eq!(conv["config"][0]["params"]["name"], "d0", "{conv}");
    assert_eq!(conv["config"][0]["params"]["rate_mib"], 8, "{conv}");
    assert_eq!(conv["config"][1]["method"], "bdev_convert_pause", "{conv}");
    let saved_file = dir.join("saved.json");
    std::fs::write(&saved_file, &saved_text).unwrap();
    drop(run);
    run = spawn_run(&sock, &cfg, Some(&saved_file));
    let r = rpc_status(&sock, "d0");
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(r["state"], "paused", "{r}");
    assert!(
        r["grains_done"].as_u64() >= b["grains_done"].as_u64(),
        "resumed behind where it stopped: {r} vs {b}"
    );
    let _ = &run;

    // Resume; `status --watch` draws the progress bar until done.
    let out = convert(&sock, "resume", &["--name", "d0"]);
    assert!(out.contains("\"converting\""), "{out}");
    let o = hostplane()
        .args(["convert", "status", "-s"])
        .arg(&sock)
        .args(["--name", "d0", "--watch"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o, "convert status --watch");
    assert!(stderr.contains("100.0%"), "progress bar: {stderr}");
    let done: Value = serde_json::from_str(&out).expect("final status JSON");
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["grains_done"], done["grains_total"], "{done}");
    assert_eq!(done["errors"], 0, "{done}");
    let st = rpc_status(&sock, "d0");
    assert_eq!(st["state"], "done", "{st}");
    assert!(!dir.join("vm.raw.convmap").exists(), "map deleted");

    // A second start on the finished target is refused with a clear error.
    let o = hostplane()
        .args(["convert", "start", "-s"])
        .arg(&sock)
        .args(["--name", "d1", "--source"])
        .arg(&src)
        .args(["--source-format", "qcow2", "--target"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("refusing to overwrite"), "{e}");

    drop(run);
    let o = Command::new("qemu-img")
        .arg("compare")
        .arg(&src)
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
