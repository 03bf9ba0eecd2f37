//! The JSON-RPC control socket of a running `hostplane run`, driven the way operators and SPDK's
//! tooling drive it: raw socket requests (framing, batches, every error code), abuse (garbage,
//! random bytes, truncated and endless input, 1000 connections at once) with bounded memory,
//! SPDK's own `spdk-rpc`, save_config → restart with --json → same state, and permissions.
//!
//! Every test spawns its own hostplane process (EAL starts once per process); a lock keeps
//! them one at a time, since each busy-polls a core.

mod common;

use hostplane::control::stream::JsonStream;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn hostplane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hostplane"))
}

/// A running `hostplane run` on net_null ports (net_null0 = uplink, net_null1 = vm).
struct Instance {
    child: Option<Child>,
    sock: PathBuf,
}

impl Instance {
    fn start(name: &str, sock: &Path, extra: &[&str]) -> Instance {
        let child = hostplane()
            .args(["run", "-l", "0-1", "--stats-interval", "0", "-r"])
            .arg(sock)
            .args(extra)
            .arg("--")
            .args(common::eal_test_args(name))
            .args(["--vdev", "net_null0", "--vdev", "net_null1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hostplane");
        let mut inst = Instance {
            child: Some(child),
            sock: sock.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(sock).is_ok() {
                return inst;
            }
            if let Some(st) = inst
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let o = inst.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "hostplane exited ({st}) before serving:\n{}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "hostplane did not serve {} within 60 s",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// A `/proc/PID/status` field in its unit (kB for VmRSS).
    fn status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .expect("field")
    }

    fn call(&self, method: &str, params: Value) -> Value {
        let r = request(
            &self.sock,
            &json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
        );
        assert!(r.get("error").is_none(), "{method}: {r}");
        r["result"].clone()
    }

    /// SIGTERM and wait; returns the output.
    fn stop(mut self) -> Output {
        let child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let o = child.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "hostplane failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads `n` JSON values (or fewer if the server closes).
fn read_values(s: &mut UnixStream, n: usize) -> Vec<Value> {
    let mut js = JsonStream::new(64 << 20);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while out.len() < n {
        let k = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        js.feed(&buf[..k]);
        while let Some(v) = js.next_value() {
            out.push(v.expect("server sent invalid JSON"));
        }
    }
    out
}

/// True once the server has closed the connection (EOF within the timeout).
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

fn request(sock: &Path, req: &Value) -> Value {
    let mut s = connect(sock);
    s.write_all(&serde_json::to_vec(req).unwrap()).unwrap();
    read_values(&mut s, 1).pop().expect("a response")
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

fn entry(ip: &str, last: u8) -> Value {
    json!({"ip": ip, "local_mac": format!("52:54:00:00:01:{last:02x}"), "global_mac": "02:00:00:00:00:01", "port": "net_null1"})
}

#[test]
fn protocol_errors_abuse_and_bounded_memory() {
    let _g = serial();
    let dir = common::temp_dir("rpc-proto");
    let sock = dir.join("hp.sock");
    let hp = Instance::start("rpc-proto", &sock, &[]);

    // Split across writes, no newline anywhere.
    let mut s = connect(&sock);
    s.write_all(br#"{"jsonrpc":"2.0","#).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(br#""id":1,"method":"spdk_get_version"}"#)
        .unwrap();
    let v = read_values(&mut s, 1);
    assert!(
        v[0]["result"]["version"]
            .as_str()
            .unwrap()
            .starts_with("hostplane"),
        "{v:?}"
    );
    // Several in one write, then a batch, on the same connection.
    s.write_all(br#"{"jsonrpc":"2.0","id":2,"method":"rpc_get_methods"}{"jsonrpc":"2.0","id":3,"method":"macnat_get_stats"}"#).unwrap();
    let v = read_values(&mut s, 2);
    assert_eq!(
        (v[0]["id"].clone(), v[1]["id"].clone()),
        (json!(2), json!(3))
    );
    assert!(v[0]["result"]
        .as_array()
        .unwrap()
        .contains(&json!("macnat_add")));
    let batch = json!([
        {"jsonrpc": "2.0", "id": 10, "method": "macnat_list", "params": {"limit": 1}},
        {"jsonrpc": "2.0", "method": "spdk_get_version"},
        {"jsonrpc": "2.0", "id": 11, "method": "no_such_method"},
        {"id": 12, "method": "spdk_get_version"},
        5,
        {"jsonrpc": "2.0", "id": 13, "method": "macnat_add", "params": {"ip": "10.0.0.2", "local_mac": "52:54:00:00:00:02", "port": "net_null1"}},
        {"jsonrpc": "2.0", "id": 14, "method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 128, "block_size": 512}},
    ]);
    s.write_all(&serde_json::to_vec(&batch).unwrap()).unwrap();
    let v = read_values(&mut s, 1).pop().unwrap();
    let v = v.as_array().expect("batch answer is an array");
    assert_eq!(v.len(), 6, "the notification gets no answer: {v:?}");
    assert_eq!(v[0]["result"]["total"], 0);
    assert_eq!((v[1]["id"].clone(), code(&v[1])), (json!(11), -32601));
    assert_eq!((v[2]["id"].clone(), code(&v[2])), (json!(12), -32600));
    assert_eq!((v[3]["id"].clone(), code(&v[3])), (Value::Null, -32600));
    assert_eq!(code(&v[4]), -32602);
    assert!(
        v[4]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("global_mac"),
        "{}",
        v[4]
    );
    assert_eq!(
        v[5]["result"], "Malloc0",
        "storage methods are backed: {}",
        v[5]
    );
    // An all-notification batch has no answer; an empty batch is invalid.
    s.write_all(br#"[{"jsonrpc":"2.0","method":"spdk_get_version"}] [] {"jsonrpc":"2.0","id":"last","method":"spdk_get_version"}"#).unwrap();
    let v = read_values(&mut s, 2);
    assert_eq!(code(&v[0]), -32600);
    assert_eq!(v[1]["id"], "last");
    // Params that are not an object.
    s.write_all(br#"{"jsonrpc":"2.0","id":4,"method":"macnat_list","params":[1]}{"jsonrpc":"2.0","id":5,"method":"macnat_list","params":{"limit":"x"}}"#).unwrap();
    let v = read_values(&mut s, 2);
    assert_eq!((code(&v[0]), code(&v[1])), (-32602, -32602));
    assert!(
        v[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("limit"),
        "{}",
        v[1]
    );
    // Garbage: parse error, then the server closes (no way to resync a byte stream).
    s.write_all(b"{\"jsonrpc\": nonsense}").unwrap();
    let v = read_values(&mut s, 1);
    assert_eq!(code(&v[0]), -32700);
    assert!(closed_by_server(&mut s));

    // Truncated JSON, then end of input.
    let mut s = connect(&sock);
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"#)
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(code(&read_values(&mut s, 1)[0]), -32700);

    let rss0 = hp.status("VmRSS:");
    let threads0 = hp.status("Threads:");

    // An endless string (up to 100 MB): cut off after 1 MiB with an error, connection closed.
    let mut s = connect(&sock);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 16];
            let mut sent = 0usize;
            let _ = w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"");
            while sent < 100 << 20 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        })
    };
    let v = read_values(&mut s, 1);
    let sent = writer.join().unwrap();
    assert_eq!(code(&v[0]), -32600, "{v:?}");
    assert!(
        v[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{v:?}"
    );
    assert!(
        sent < 8 << 20,
        "the server kept reading an endless request ({sent} bytes)"
    );

    // Random bytes on 20 connections: an error or silence, never a hang or a crash.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20 {
        let mut s = connect(&sock);
        let bytes: Vec<u8> = (0..65536)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        for v in read_values(&mut s, usize::MAX) {
            assert!(v.get("error").is_some(), "random bytes got a result: {v}");
        }
    }

    // 1000 connections at once (50 threads × 20 held open), each asking one thing; those
    // beyond the connection cap are told so. Then 1000 more that open and close at once.
    let started = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut conns: Vec<UnixStream> = (0..20).map(|_| connect(&sock)).collect();
                for (i, c) in conns.iter_mut().enumerate() {
                    let _ = c.write_all(
                        format!(
                            r#"{{"jsonrpc":"2.0","id":{},"method":"macnat_get_stats"}}"#,
                            t * 100 + i
                        )
                        .as_bytes(),
                    );
                }
                let (mut ok, mut busy) = (0, 0);
                for c in conns.iter_mut() {
                    match read_values(c, 1).pop() {
                        Some(v) if v.get("result").is_some() => ok += 1,
                        Some(v)
                            if v["error"]["message"]
                                .as_str()
                                .unwrap_or("")
                                .contains("too many connections") =>
                        {
                            busy += 1
                        }
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                (ok, busy)
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let (o, b) = h.join().unwrap();
        ok += o;
        busy += b;
    }
    assert_eq!(ok + busy, 1000);
    assert!(ok >= 64, "at least the cap's worth were served ({ok})");
    for _ in 0..1000 {
        drop(connect(&sock));
    }
    println!(
        "1000 concurrent: {ok} served, {busy} told to retry, {:?}",
        started.elapsed()
    );

    // Still answering; threads back to where they were; memory bounded.
    let v = hp.call("macnat_add", entry("10.9.0.1", 1));
    assert_eq!(v["total"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hp.status("Threads:") > threads0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rss1, threads1) = (hp.status("VmRSS:"), hp.status("Threads:"));
    println!("VmRSS {rss0} kB -> {rss1} kB, threads {threads0} -> {threads1}");
    assert!(
        threads1 <= threads0,
        "connection threads left behind: {threads0} -> {threads1}"
    );
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} kB to {rss1} kB"
    );
    hp.stop();
    assert!(!sock.exists(), "the socket is removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}

fn spdk_rpc() -> Option<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("spdk-rpc"))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "spdk"])
        .status();
    find()
}

fn spdk(bin: &Path, sock: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("-s")
        .arg(sock)
        .args(args)
        .output()
        .expect("spdk-rpc")
}

fn spdk_json(bin: &Path, sock: &Path, args: &[&str]) -> Value {
    let o = spdk(bin, sock, args);
    assert!(
        o.status.success(),
        "spdk-rpc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "spdk-rpc {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

#[test]
fn spdk_rpc_client_drives_hostplane() {
    let Some(bin) = spdk_rpc() else {
        println!("SKIP: spdk-rpc not found and `pip install spdk` failed");
        return;
    };
    let _g = serial();
    let dir = common::temp_dir("rpc-spdk");
    let sock = dir.join("hp.sock");
    let hp = Instance::start("rpc-spdk", &sock, &[]);
    hp.call(
        "macnat_add",
        json!({"entries": [entry("10.1.0.1", 1), entry("fd00::1:2", 2)]}),
    );

    let v = spdk_json(&bin, &sock, &["spdk_get_version"]);
    assert!(
        v["version"].as_str().unwrap().starts_with("hostplane") && v["fields"]["major"].is_u64(),
        "{v}"
    );
    let v = spdk_json(&bin, &sock, &["rpc_get_methods"]);
    for m in [
        "spdk_get_version",
        "framework_get_reactors",
        "macnat_add",
        "net_get_stats",
        "save_config",
    ] {
        assert!(
            v.as_array().unwrap().contains(&json!(m)),
            "{m} missing from {v}"
        );
    }
    let v = spdk_json(&bin, &sock, &["framework_get_reactors"]);
    assert!(v["tick_rate"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["reactors"][0]["lcore"], 1, "{v}");
    assert!(
        v["reactors"][0]["busy"].as_u64().unwrap() + v["reactors"][0]["idle"].as_u64().unwrap() > 0,
        "{v}"
    );
    // spdk-rpc's save_config asks framework_get_subsystems + framework_get_config.
    let saved = spdk_json(&bin, &sock, &["save_config"]);
    let entries = &saved["subsystems"][0]["config"][0]["params"]["entries"];
    assert_eq!(saved["subsystems"][0]["subsystem"], "macnat");
    assert_eq!(entries.as_array().map(Vec::len), Some(2), "{saved}");
    // ... and its load_config replays it (rpc_get_methods, then each call).
    hp.call("macnat_delete", json!({"ips": ["10.1.0.1", "fd00::1:2"]}));
    let file = dir.join("spdk-saved.json");
    std::fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();
    let o = spdk(&bin, &sock, &["load_config", "-j", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hp.call("macnat_list", json!({}))["entries"], *entries);
    // Storage through SPDK's client: real results (a service reactor backs them without
    // storage lcores).
    let o = spdk(
        &bin,
        &sock,
        &["bdev_malloc_create", "-b", "Malloc0", "64", "512"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "Malloc0");
    let v = spdk_json(&bin, &sock, &["bdev_get_bdevs", "-b", "Malloc0"]);
    assert_eq!(
        (
            v[0]["name"].clone(),
            v[0]["num_blocks"].clone(),
            v[0]["block_size"].clone()
        ),
        (json!("Malloc0"), json!(131072), json!(512)),
        "{v}"
    );
    hp.call(
        "bdev_io",
        json!({"name": "Malloc0", "rw": "write", "count": 10, "queue_depth": 4}),
    );
    let v = spdk_json(&bin, &sock, &["bdev_get_iostat", "--names", "Malloc0"]);
    assert!(v["tick_rate"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["bdevs"][0]["num_write_ops"], 10, "{v}");
    assert_eq!(v["bdevs"][0]["bytes_written"], 40960, "{v}");
    let o = spdk(&bin, &sock, &["bdev_malloc_delete", "Malloc0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    hp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn cli(sock: &Path, args: &[&str]) -> Output {
    hostplane()
        .arg("rpc")
        .arg("-s")
        .arg(sock)
        .args(args)
        .output()
        .expect("hostplane rpc")
}

#[test]
fn save_config_restart_with_json_gives_the_same_state() {
    let _g = serial();
    let dir = common::temp_dir("rpc-save");
    let sock = dir.join("hp.sock");
    let file = dir.join("saved.json");
    let hp = Instance::start("rpc-save-a", &sock, &[]);
    // Through the CLI: --name value params, numbers/strings parsed, result printed as JSON.
    let o = cli(
        &sock,
        &[
            "macnat_add",
            "--ip",
            "10.2.0.1",
            "--local-mac",
            "52:54:00:00:02:01",
            "--global-mac",
            "02:00:00:00:00:01",
            "--port",
            "net_null1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["total"], 1);
    let o = cli(&sock, &["--json", &json!({"method": "macnat_add", "params": {"entries": [entry("10.2.0.2", 2), entry("10.2.0.3", 3), entry("fd00::2:4", 4)]}}).to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli(&sock, &["macnat_delete", "--ip", "10.2.0.2"]);
    assert!(o.status.success());
    let o = cli(&sock, &["macnat_delete", "--ip", "10.2.0.2"]);
    assert!(!o.status.success(), "deleting a missing entry fails");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("-32602") && err.contains("ip: 10.2.0.2 is not in the table"),
        "{err}"
    );
    let before = hp.call("macnat_list", json!({"limit": 100}));
    assert_eq!(before["total"], 3);
    let o = cli(&sock, &["save_config", "--file", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    hp.stop();
    assert!(!sock.exists());

    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["subsystems"][0]["config"][0]["method"], "macnat_add");
    let hp = Instance::start("rpc-save-b", &sock, &["--json", file.to_str().unwrap()]);
    assert_eq!(hp.call("macnat_list", json!({"limit": 100})), before);
    // The same file through load_config on a live instance is idempotent (macnat_add, and the
    // bdev subsystem's class table).
    assert_eq!(hp.call("load_config", json!({"file": file}))["calls"], 2);
    assert_eq!(hp.call("macnat_list", json!({"limit": 100})), before);
    hp.stop();

    // A broken --json fails before EAL starts, naming the field.
    std::fs::write(&file, r#"{"subsystems":[{"subsystem":"macnat","config":[{"method":"macnat_add","params":{"ip":"10.0.0.1","local_mac":"zz","global_mac":"02:00:00:00:00:01","port":"vm0"}}]}]}"#).unwrap();
    let o = hostplane()
        .args(["run", "-r"])
        .arg(&sock)
        .arg("--json")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("local_mac"), "{err}");
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn socket_is_private_and_exclusive() {
    let _g = serial();
    let dir = common::temp_dir("rpc-perm");
    let sock = dir.join("hp.sock");
    // A stale socket (its process died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let hp = Instance::start("rpc-perm", &sock, &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // A live one is not.
    let o = hostplane().args(["run", "-r"]).arg(&sock).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another process"),
        "{err}"
    );
    assert!(request(
        &sock,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "spdk_get_version"})
    )
    .get("result")
    .is_some());
    // Something that is not a socket is never deleted.
    let plain = dir.join("plain");
    std::fs::write(&plain, "keep").unwrap();
    let o = hostplane()
        .args(["run", "-r"])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP other-uid check: not root");
    } else {
        // The dir is world-searchable, so only the socket's own mode keeps `nobody` out.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_hostplane"),
                "rpc",
                "-s",
            ])
            .arg(&sock)
            .arg("spdk_get_version")
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("Permission denied"),
            "uid 65534 connected: {err}"
        );
    }
    hp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
