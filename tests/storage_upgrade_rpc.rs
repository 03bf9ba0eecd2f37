//! `bdev_pause`, `bdev_resume`, `bdev_upgrade` and `bdev_get_service_stats` over the JSON-RPC
//! socket of a spawned `hostplane run` with a storage-only config (its own EAL, its own socket).

mod common;

use hostplane::control::client::{call, ClientError};
use serde_json::{json, Value};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The spawned `hostplane run`, killed if the test fails half-way (no orphan keeps running).
struct Run(Option<Child>);

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn service_methods_over_the_socket() {
    let dir = common::temp_dir("upgrade-rpc");
    let sock = common::rpc_socket("upgrade-rpc");
    let file = dir.join("data.img");
    let cfg = dir.join("storage.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[eal]
lcores = "0-1"
args = {eal:?}

[[vm]]
name = "vm1"
[[vm.disk]]
name = "root"
system = "malloc"
params = {{ size_mib = 4 }}
[[vm.disk]]
name = "data"
system = "file"
params = {{ path = "{file}", size_mib = 4, direct = false }}
"#,
            eal = common::eal_test_args("upgrade-rpc"),
            file = file.display(),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hostplane"))
        .args(["run", "--stats-interval", "0", "-r"])
        .arg(&sock)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hostplane run");
    let mut run = Run(Some(child));
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&sock).is_err() {
        if let Some(Ok(Some(st))) = run.0.as_mut().map(Child::try_wait) {
            panic!("hostplane run exited early: {st}");
        }
        assert!(Instant::now() < deadline, "no RPC socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Duration::from_secs(20);
    let rpc = |m: &str, p: Value| call(&sock, m, p, t);

    let all = rpc("bdev_get_service_stats", Value::Null).unwrap();
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1/root", "vm1/data"]);
    assert_eq!(all[1]["system"], "file");
    assert_eq!(all[1]["paused"], false);

    let p = rpc(
        "bdev_pause",
        json!({"name": "vm1/data", "drain_timeout_ms": 1000}),
    )
    .unwrap();
    assert_eq!(p["drained"], true, "{p}");
    assert_eq!(p["name"], "vm1/data");
    let s = rpc("bdev_get_service_stats", json!({"name": "vm1/data"})).unwrap();
    assert_eq!(s[0]["paused"], true, "{s}");
    std::thread::sleep(Duration::from_millis(20));
    let r = rpc("bdev_resume", json!({"name": "vm1/data"})).unwrap();
    assert!(r["paused_ms"].as_f64().unwrap() >= 20.0, "{r}");

    // Reopen the file at a new path (same size): generation 1, new params saved.
    let moved = dir.join("data-moved.img");
    std::fs::copy(&file, &moved).unwrap();
    let u = rpc(
        "bdev_upgrade",
        json!({"name": "vm1/data", "path": moved.display().to_string()}),
    )
    .unwrap();
    assert_eq!(u["generation"], 1, "{u}");
    let s = rpc("bdev_get_service_stats", json!({"name": "vm1/data"})).unwrap();
    assert_eq!(s[0]["params"]["path"], moved.display().to_string());
    assert_eq!(s[0]["upgrades"], 1);

    // Refusals: a different size, bad params, an unknown bdev. Nothing stays paused.
    let big = dir.join("big.img");
    let e = rpc(
        "bdev_upgrade",
        json!({"name": "vm1/data", "params": {"path": big.display().to_string(), "size_mib": 8}}),
    )
    .unwrap_err();
    assert!(
        matches!(&e, ClientError::Rpc { message, .. } if message.contains("geometry")),
        "{e}"
    );
    let e = rpc("bdev_upgrade", json!({"name": "vm1/data", "bogus": 1})).unwrap_err();
    assert!(
        matches!(&e, ClientError::Rpc { code: -32602, message, .. } if message.contains("bogus")),
        "{e}"
    );
    let e = rpc("bdev_pause", json!({"name": "vm9/none"})).unwrap_err();
    assert!(matches!(&e, ClientError::Rpc { code: -32602, .. }), "{e}");
    let s = rpc("bdev_get_service_stats", json!({"name": "vm1/data"})).unwrap();
    assert_eq!(s[0]["paused"], false, "{s}");
    let methods = rpc("rpc_get_methods", Value::Null).unwrap();
    for m in [
        "bdev_pause",
        "bdev_resume",
        "bdev_upgrade",
        "bdev_get_service_stats",
    ] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m}");
    }

    let Some(child) = run.0.take() else {
        unreachable!("the child is taken only here")
    };
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
