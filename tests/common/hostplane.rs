//! A `hostplane run` child process for integration tests: its own RPC socket, vhost sockets in
//! a test directory, its output in `DIR/hostplane.log`, killed when dropped.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A `hostplane run` child process with its own RPC socket and vhost socket directory.
pub struct Hostplane {
    child: Option<Child>,
    /// Its JSON-RPC socket.
    pub rpc: PathBuf,
    log: PathBuf,
}

impl Hostplane {
    /// `hostplane run -l 0-1 --config CONFIG -r SOCK --vhost-dir DIR EXTRA...`; returns once it
    /// answers JSON-RPC.
    pub fn start(dir: &Path, config: &Path, extra: &[&str]) -> Hostplane {
        let rpc = super::rpc_socket("hostplane");
        let log = dir.join("hostplane.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hostplane"))
            .args(["run", "-l", "0-1", "--stats-interval", "0", "--config"])
            .arg(config)
            .arg("-r")
            .arg(&rpc)
            .arg("--vhost-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn hostplane run");
        let hp = Hostplane {
            child: Some(child),
            rpc,
            log,
        };
        let until = Instant::now() + Duration::from_secs(60);
        while !hp.rpc.exists() {
            assert!(
                Instant::now() < until,
                "hostplane did not start:\n{}",
                hp.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The socket is bound before EAL starts; the first answer comes once all is up.
        if let Err(e) = hp.rpc("spdk_get_version", &[]) {
            panic!("hostplane does not answer: {e}\n{}", hp.log_text());
        }
        hp
    }

    /// Everything it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `hostplane rpc -s SOCK METHOD ARGS...`: the result, or the error text.
    pub fn rpc(&self, method: &str, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_hostplane"))
            .args(["rpc", "-s"])
            .arg(&self.rpc)
            .arg(method)
            .args(args)
            .output()
            .expect("run hostplane rpc");
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `hostplane convert SUB -s SOCK ARGS...`: the status JSON it prints (panics on failure).
    pub fn convert(&self, sub: &str, args: &[&str]) -> Value {
        let o = Command::new(env!("CARGO_BIN_EXE_hostplane"))
            .args(["convert", sub, "-s"])
            .arg(&self.rpc)
            .args(args)
            .output()
            .expect("run hostplane convert");
        assert!(
            o.status.success(),
            "hostplane convert {sub}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log_text()
        );
        serde_json::from_slice(&o.stdout).expect("convert prints JSON")
    }

    /// SIGTERM, then the exit status and the log.
    pub fn stop(mut self) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child process, not yet waited for (its pid is still ours).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let ok = child.wait().map(|s| s.success()).unwrap_or(false);
        (ok, self.log_text())
    }

    /// SIGKILL: a crash, nothing cleaned up (the sockets stay, stale).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Hostplane {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
