//! Shared helpers for integration tests that start EAL.
//!
//! EAL can be initialised once per process, so each test file that starts EAL holds exactly one
//! `#[test]` (cargo runs every test file as its own process).
#![allow(dead_code)]

pub mod hostplane;
pub mod nbd;

/// EAL arguments for a test: no hugepages, no PCI scan, no shared config, a unique file prefix.
///
/// DPDK 22.11 refuses `--in-memory` together with `--no-huge` ("--legacy-mem is not compatible
/// with --in-memory": --no-huge implies legacy memory), so tests use `--no-shconf`, which
/// likewise leaves no runtime files behind, plus a unique `--file-prefix`.
pub fn eal_test_args(name: &str) -> Vec<String> {
    vec![
        "--no-huge".into(),
        "--no-pci".into(),
        "--no-shconf".into(),
        "-m".into(),
        "256".into(),
        "--file-prefix".into(),
        format!("hp-test-{name}-{}", std::process::id()),
        "--log-level".into(),
        "lib.eal:warning".into(),
    ]
}

/// A unique JSON-RPC socket path for one `hostplane run` (pass it with `-r` or as
/// `HOSTPLANE_RPC_SOCKET`), so test processes running at once never share the default socket.
pub fn rpc_socket(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("hp-{name}-{}-{n}.sock", std::process::id()))
}

/// A fresh temp dir for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Where the shared captures live (`../shared/pcaps` from the project root), if present.
pub fn shared_pcaps() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/pcaps");
    p.is_dir().then_some(p)
}

/// One JSON-RPC 2.0 call on a `hostplane run` control socket: `Ok(result)` or `Err(error)`
/// (the error object, or a description of a transport failure).
pub fn rpc_call(
    sock: &std::path::Path,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, serde_json::Value> {
    use std::io::{Read, Write};
    let transport = |e: std::io::Error| serde_json::json!({ "transport": e.to_string() });
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(transport)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(transport)?;
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(&serde_json::to_vec(&req).expect("serialisable"))
        .map_err(transport)?;
    let mut js = ::hostplane::control::stream::JsonStream::new(64 << 20);
    let mut buf = [0u8; 65536];
    loop {
        let k = s.read(&mut buf).map_err(transport)?;
        if k == 0 {
            return Err(serde_json::json!({ "transport": "server closed the connection" }));
        }
        js.feed(&buf[..k]);
        if let Some(v) = js.next_value() {
            let mut v = v.map_err(|e| serde_json::json!({ "transport": e.to_string() }))?;
            return match v.get_mut("error") {
                Some(e) => Err(e.take()),
                None => Ok(v["result"].take()),
            };
        }
    }
}
