//! Backends without EAL: reactors on plain threads. Data integrity on malloc, null and file
//! (direct and buffered, and across a reopen), and every error path with its counter.

mod common;

use hostplane::storage::client::{compare, verify_patterns, BdevClient, Op};
use hostplane::storage::reactor::{ReactorOptions, ReactorSet};
use hostplane::storage::{BackendRegistry, IoStatus};
use serde_json::json;
use std::process::Command;

fn reactors(n: usize) -> ReactorSet {
    ReactorSet::spawn_threads(n, ReactorOptions::polite()).expect("spawn reactors")
}

#[test]
fn malloc_integrity_two_reactors() {
    let set = reactors(2);
    let reg = BackendRegistry::with_builtin();
    let b = reg
        .create("malloc", "m", &json!({"size_mib": 16}), false)
        .unwrap();
    let c0 = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
    let c1 = BdevClient::open(&set.handle(1).unwrap(), &b).unwrap();
    let mut model = vec![0u8; 16 << 20];
    let r = verify_patterns(&c0, &mut model, 11, 30, 32, 256, true).unwrap();
    assert!(r.writes > 500 && r.zeroes > 50, "{r:?}");
    // Second pass from the other reactor on top of the first.
    verify_patterns(&c1, &mut model, 12, 10, 32, 256, true).unwrap();
    assert_eq!(compare(&c0, &model).unwrap(), 16 << 20);
    let s = b.iostat();
    assert_eq!(s.io_error.total(), 0, "{s:?}");
    assert!(s.num_unmap_ops > 0 && s.num_write_zeroes_ops > 0 && s.num_flush_ops == 2);
}

#[test]
fn null_discards_and_reads_zeros() {
    let set = reactors(1);
    let b = BackendRegistry::with_builtin()
        .create(
            "null",
            "n",
            &json!({"size_mib": 1, "block_size": 4096}),
            false,
        )
        .unwrap();
    let c = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
    assert_eq!(c.write(0, &[0xab; 8192]), IoStatus::Success);
    assert_eq!(c.read(0, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(
        c.status(Op::Unmap {
            offset: 4096,
            len: 4096
        }),
        IoStatus::Success
    );
    assert_eq!(b.iostat().num_write_ops, 1);
}

fn file_integrity(direct: bool) {
    let dir = common::temp_dir(&format!("file-{direct}"));
    let path = dir.join("disk.img");
    let params = json!({"path": path, "size_mib": 32, "direct": direct});
    let reg = BackendRegistry::with_builtin();
    let mut model = vec![0u8; 32 << 20];
    {
        let set = reactors(2);
        let b = reg.create("file", "f", &params, false).unwrap();
        assert_eq!(b.info().size(), 32 << 20);
        let c0 = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
        let c1 = BdevClient::open(&set.handle(1).unwrap(), &b).unwrap();
        verify_patterns(&c0, &mut model, 21, 25, 48, 512, true).unwrap();
        verify_patterns(&c1, &mut model, 22, 10, 48, 512, true).unwrap();
        assert_eq!(b.iostat().io_error.total(), 0);
        // Everything is dropped here: reactors stopped, channels and file closed.
    }
    // "Restart": a new set of reactors and a new bdev on the same file see the same bytes.
    let set = reactors(1);
    let b = reg
        .create("file", "f", &json!({"path": path, "direct": direct}), false)
        .unwrap();
    assert_eq!(b.info().size(), 32 << 20);
    let c = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
    assert_eq!(compare(&c, &model).unwrap(), 32 << 20);
    // And the file itself holds them (read with std, behind hostplane's back).
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk == model, "file content differs from the model");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn file_integrity_direct_and_restart() {
    file_integrity(true);
}

#[test]
fn file_integrity_buffered_and_restart() {
    file_integrity(false);
}

#[test]
fn error_paths_complete_with_status_and_counter() {
    let set = reactors(1);
    let reg = BackendRegistry::with_builtin();
    let dir = common::temp_dir("errpaths");
    for (t, params) in [
        ("malloc", json!({"size_mib": 1})),
        ("file", json!({"path": dir.join("e.img"), "size_mib": 1})),
    ] {
        let b = reg.create(t, t, &params, false).unwrap();
        let c = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
        assert_eq!(c.read(1 << 20, 512), Err(IoStatus::OutOfRange), "{t}");
        assert_eq!(
            c.write((1 << 20) - 512, &[1u8; 1024]),
            IoStatus::OutOfRange,
            "{t}"
        );
        assert_eq!(
            c.status(Op::Unmap {
                offset: u64::MAX - 511,
                len: 1024
            }),
            IoStatus::OutOfRange,
            "{t}"
        );
        assert_eq!(c.read(100, 512), Err(IoStatus::Unaligned), "{t}");
        assert_eq!(c.write(0, &[1u8; 100]), IoStatus::Unaligned, "{t}");
        assert_eq!(c.read(0, 0), Err(IoStatus::Invalid), "{t}");
        let e = b.iostat().io_error;
        assert_eq!(
            (e.out_of_range, e.unaligned, e.invalid),
            (3, 2, 1),
            "{t}: {e:?}"
        );
        // Read-only: the same backend opened read-only refuses every write-type request.
        let ro = reg.create(t, &format!("{t}-ro"), &params, true).unwrap();
        let c = BdevClient::open(&set.handle(0).unwrap(), &ro).unwrap();
        assert_eq!(c.write(0, &[1u8; 512]), IoStatus::ReadOnly);
        assert_eq!(
            c.status(Op::WriteZeroes {
                offset: 0,
                len: 512
            }),
            IoStatus::ReadOnly
        );
        assert_eq!(
            c.status(Op::Unmap {
                offset: 0,
                len: 512
            }),
            IoStatus::ReadOnly
        );
        assert!(c.read(0, 512).is_ok());
        assert_eq!(ro.iostat().io_error.read_only, 3);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file on a 1 MiB tmpfs that claims 8 MiB: writes past the space fail with ENOSPC.
#[test]
fn backend_io_error_on_full_tmpfs() {
    let dir = common::temp_dir("fulltmpfs");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP backend_io_error_on_full_tmpfs: cannot mount a tmpfs (needs root)");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        for direct in [true, false] {
            let path = dir.join(format!("full-{direct}.img"));
            let set = reactors(1);
            let b = BackendRegistry::with_builtin()
                .create(
                    "file",
                    "full",
                    &json!({"path": path, "size_mib": 8, "direct": direct}),
                    false,
                )
                .unwrap();
            let c = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
            let mut statuses = Vec::new();
            for i in 0..8u64 {
                statuses.push(c.write(i << 20, &vec![0x5a; 1 << 20]));
            }
            assert_eq!(
                statuses[0],
                IoStatus::Success,
                "direct={direct}: {statuses:?}"
            );
            let errors = statuses
                .iter()
                .filter(|s| **s == IoStatus::IoError(libc::ENOSPC))
                .count();
            assert!(
                errors >= 6,
                "direct={direct}: expected ENOSPC, got {statuses:?}"
            );
            let s = b.iostat();
            assert_eq!(s.io_error.io_error, errors as u64);
            assert!(s.num_write_ops >= 1);
            // The bdev keeps working: reads of what was written succeed.
            assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
            drop(c);
            drop(set);
            let _ = std::fs::remove_file(&path);
        }
    });
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
