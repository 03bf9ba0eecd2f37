//! A real `qemu-nbd` for tests that replace NBD servers under load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A qemu-nbd serving `image` on a Unix socket, with image locking off so that an old and a new
/// server may have the image open at once (a blue/green switch).
pub struct QemuNbd {
    child: Child,
    /// The server's Unix socket.
    pub sock: PathBuf,
    /// Spawn → accepting connections.
    pub startup: Duration,
}

impl QemuNbd {
    pub fn start(image: &Path, sock: &Path) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let t0 = Instant::now();
        let child = Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--shared=8",
                "-x",
                "disk0",
                "--discard=unmap",
                "--cache=none",
                "--aio=threads",
                "-k",
            ])
            .arg(sock)
            .arg("--image-opts")
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={},file.locking=off",
                image.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-nbd");
        let deadline = t0 + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_micros(500));
        }
        QemuNbd {
            child,
            sock: sock.to_path_buf(),
            startup: t0.elapsed(),
        }
    }

    pub fn address(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    /// Stops the server (SIGTERM, wait). Returns how long that took.
    pub fn stop(mut self) -> Duration {
        let t0 = Instant::now();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let d = t0.elapsed();
        let _ = std::fs::remove_file(&self.sock);
        d
    }

    /// Kills it at once (the service dies with requests in flight).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
