//! Online conversion (docs/convert.md): images equal their source after a conversion with no VM
//! IO (qcow2 with a backing file, zero clusters, compressed clusters; sparse and flat vmdk; raw), bad input
//! refused at start, a host-side pattern writer through the convert bdev while it converts, and
//! kill -9 of a converting `hostplane convert offline` at random points. No EAL: plain-thread
//! reactors (the RPC path with EAL is tests/convert_rpc.rs).

mod common;

use hostplane::storage::client::BdevClient;
use hostplane::storage::convert::source::SourceFormat;
use hostplane::storage::convert::tool::{pattern, writer_target};
use hostplane::storage::convert::{Conversion, ConvertParams};
use hostplane::storage::reactor::{ReactorOptions, ReactorSet};
use hostplane::storage::{BackendRegistry, IoStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(cmd: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// base.qcow2 (data at several places) ← over.qcow2 (own data, zero clusters over base data,
/// data near the end), plus compressed, flat vmdk and raw copies of over.qcow2.
fn make_images(dir: &Path) {
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        dir,
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 20M 3M",
            "-c",
            "write -P 0x33 40M 1M",
            "-c",
            "write -P 0x66 50M 64k",
            "base.qcow2",
        ],
        dir,
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
            "over.qcow2",
        ],
        dir,
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 100k",
            "-c",
            "write -z 20M 1M",
            "-c",
            "write -z 50M 64k",
            "-c",
            "write -P 0x55 63M 1M",
            "-c",
            "write -P 0x77 33M 4k",
            "over.qcow2",
        ],
        dir,
    );
    // Copies of over.qcow2: compressed qcow2; vmdk flat, plain `-O vmdk` (= monolithicSparse, a
    // hosted sparse extent, read by our own reader), sparse with zeroed grains, streamOptimized.
    for (fmt, opts, name) in [
        ("qcow2", "-c", "comp.qcow2"),
        ("vmdk", "subformat=monolithicFlat", "flat.vmdk"),
        ("vmdk", "", "sparse.vmdk"),
        ("vmdk", "zeroed_grain=on", "zg.vmdk"),
        ("vmdk", "subformat=streamOptimized", "stream.vmdk"),
    ] {
        let mut a = vec!["convert", "-O", fmt];
        match opts {
            "" => {}
            "-c" => a.push("-c"),
            o => a.extend(["-o", o]),
        }
        a.extend(["over.qcow2", name]);
        sh("qemu-img", &a, dir);
    }
    sh(
        "qemu-img",
        &["convert", "-O", "raw", "over.qcow2", "ref.raw"],
        dir,
    );
}

fn params(dir: &Path, src: &str, fmt: SourceFormat, target: &str) -> ConvertParams {
    ConvertParams {
        name: format!("c-{target}"),
        source: dir.join(src),
        source_format: fmt,
        target: dir.join(target),
        grain_size: 65536,
        rate_mib: 0,
        block_size: 512,
        map: None,
        direct: true,
        reactor: 0,
    }
}

fn wait_done(c: &Conversion, limit: Duration) {
    let t = Instant::now();
    while !c.stats.is_done() {
        assert!(
            t.elapsed() < limit,
            "conversion stuck: {:?}",
            c.stats.status()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn converted_images_equal_their_source_and_bad_input_is_refused() {
    let dir = common::temp_dir("convert-equal");
    make_images(&dir);
    let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
    let h = set.handle(0).unwrap();
    for (src, fmt, grain) in [
        ("over.qcow2", SourceFormat::Qcow2, 65536),
        ("comp.qcow2", SourceFormat::Qcow2, 65536),
        ("flat.vmdk", SourceFormat::Vmdk, 65536),
        ("sparse.vmdk", SourceFormat::Vmdk, 65536),
        ("sparse.vmdk", SourceFormat::Vmdk, 4096),
        ("zg.vmdk", SourceFormat::Vmdk, 65536),
        ("ref.raw", SourceFormat::Raw, 65536),
        ("over.qcow2", SourceFormat::Qcow2, 4096),
        ("over.qcow2", SourceFormat::Qcow2, 1 << 20),
    ] {
        let target = format!("{src}.{grain}.raw");
        let mut p = params(&dir, src, fmt, &target);
        p.grain_size = grain;
        let c = Conversion::prepare(p).unwrap();
        assert!(!c.resumed);
        c.attach(&h).unwrap();
        wait_done(&c, Duration::from_secs(60));
        assert!(
            !dir.join(format!("{target}.convmap")).exists(),
            "map deleted"
        );
        compare(&dir.join(src), &dir.join(&target));
        let st = c.stats.status();
        assert_eq!((st.grains_done, st.errors), (st.grains_total, 0), "{st:?}");
        println!("{src} grain {grain}: {st:?}");
    }

    // Bad input: clear errors at start, nothing created.
    let err = |p: ConvertParams| Conversion::prepare(p).err().unwrap().to_string();
    // A sparse vmdk cut short (its grains beyond the end of the file).
    let sparse = std::fs::read(dir.join("sparse.vmdk")).unwrap();
    std::fs::write(dir.join("trunc.vmdk"), &sparse[..sparse.len() / 2]).unwrap();
    let e = err(params(&dir, "trunc.vmdk", SourceFormat::Vmdk, "x1.raw"));
    assert!(e.contains("truncated"), "{e}");
    let e = err(params(&dir, "stream.vmdk", SourceFormat::Vmdk, "x1.raw"));
    assert!(e.contains("streamOptimized"), "{e}");
    let e = err(params(&dir, "over.qcow2", SourceFormat::Raw, "x2.raw"));
    assert!(e.contains("is a qcow2 image, not raw"), "{e}");
    let e = err(params(&dir, "ref.raw", SourceFormat::Qcow2, "x3.raw"));
    assert!(e.contains("bad magic"), "{e}");
    let base = std::fs::read(dir.join("base.qcow2")).unwrap();
    std::fs::write(dir.join("trunc.qcow2"), &base[..200_000]).unwrap();
    let e = err(params(&dir, "trunc.qcow2", SourceFormat::Qcow2, "x4.raw"));
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(
        dir.join("junk.qcow2"),
        b"QFI\xfb\0\0\0\x03 and nothing else",
    )
    .unwrap();
    let e = err(params(&dir, "junk.qcow2", SourceFormat::Qcow2, "x5.raw"));
    assert!(e.contains("junk.qcow2"), "{e}");
    let e = err(params(&dir, "missing.qcow2", SourceFormat::Qcow2, "x6.raw"));
    assert!(e.contains("No such file"), "{e}");
    // A finished conversion's target (no map) is never overwritten.
    let e = err(params(
        &dir,
        "over.qcow2",
        SourceFormat::Qcow2,
        "over.qcow2.65536.raw",
    ));
    assert!(e.contains("refusing to overwrite"), "{e}");
    // A target bdev smaller than the source.
    let small = BackendRegistry::with_builtin()
        .create(
            "malloc",
            "small",
            &serde_json::json!({"size_mib": 32}),
            false,
        )
        .unwrap();
    let mut p = params(&dir, "over.qcow2", SourceFormat::Qcow2, "x7.raw");
    p.map = Some(dir.join("x7.convmap"));
    let e = Conversion::prepare_on(p, Some(small))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot hold the source"), "{e}");
    for i in 1..=7 {
        assert!(!dir.join(format!("x{i}.raw")).exists());
        assert!(!dir.join(format!("x{i}.raw.convmap")).exists());
    }
    assert!(!dir.join("x7.convmap").exists());
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_writer_during_conversion_matches_a_replayed_reference() {
    let dir = common::temp_dir("convert-io");
    make_images(&dir);
    let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
    let h = set.handle(0).unwrap();
    let mut p = params(&dir, "over.qcow2", SourceFormat::Qcow2, "t.raw");
    p.rate_mib = 40; // ~1.6 s for 64 MiB: the writer runs while most grains are unconverted
    let c = Conversion::prepare(p).unwrap();
    c.attach(&h).unwrap();
    let client = BdevClient::open(&h, &c.bdev).unwrap();
    let disk = c.bdev.info().size();
    let mut reference = std::fs::read(dir.join("ref.raw")).unwrap();
    let mut seq = 0u64;
    let mut reads = 0;
    while !c.stats.is_done() && seq < 600 {
        // Four writes in flight (partial and whole grains), then a read-back of one of them.
        let batch: Vec<_> = (0..4)
            .map(|_| {
                let (off, len) = writer_target(seq, disk);
                let data = pattern(seq, len as usize);
                seq += 1;
                let rx = client.submit(hostplane::storage::client::Op::Write {
                    offset: off,
                    data: data.clone(),
                });
                (off, data, rx)
            })
            .collect();
        for (off, data, rx) in batch {
            let (st, _) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(st, IoStatus::Success);
            reference[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        // Reads anywhere (converted or not) see source data or our writes.
        let off = (seq.wrapping_mul(2_654_435_761) % (disk / 4096)) * 4096;
        let got = client.read(off, 8192.min(disk - off)).unwrap();
        assert_eq!(
            got,
            reference[off as usize..off as usize + got.len()],
            "read at {off}"
        );
        reads += 1;
    }
    wait_done(&c, Duration::from_secs(60));
    let st = c.stats.status();
    println!("{seq} writes, {reads} reads during conversion: {st:?}");
    assert!(st.vm_copies > 0, "VM IO triggered copies: {st:?}");
    drop(client);
    drop(set);
    let target = std::fs::read(dir.join("t.raw")).unwrap();
    assert!(target == reference, "target differs from source + writes");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Parses the writer's log: intents (seq → offset, len) and acknowledged seqs.
fn read_log(p: &Path) -> (BTreeMap<u64, (u64, u64)>, BTreeSet<u64>) {
    let mut intents = BTreeMap::new();
    let mut acked = BTreeSet::new();
    for l in std::fs::read_to_string(p).unwrap_or_default().lines() {
        let f: Vec<&str> = l.split(' ').collect();
        match f.as_slice() {
            ["I", s, o, n] => {
                intents.insert(s.parse().unwrap(), (o.parse().unwrap(), n.parse().unwrap()));
            }
            ["A", s] => {
                acked.insert(s.parse().unwrap());
            }
            _ => {} // a line cut by the kill
        }
    }
    (intents, acked)
}

/// Every acknowledged write is in the target file.
fn check_acked(target: &[u8], log: &Path) -> usize {
    let (intents, acked) = read_log(log);
    for s in &acked {
        let (off, len) = intents[s];
        // A later write to the same slot may have overwritten part of it (slots repeat only on
        // non-power-of-two disks; these are 64 MiB): the writer's slots here never repeat.
        let want = pattern(*s, len as usize);
        assert!(
            target[off as usize..(off + len) as usize] == want[..],
            "acknowledged write {s} at {off}+{len} is missing"
        );
    }
    acked.len()
}

#[test]
fn kill_9_at_random_points_resumes_and_keeps_acknowledged_writes() {
    let n: u32 = std::env::var("CONVERT_CRASH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = common::temp_dir("convert-crash");
    make_images(&dir);
    let target = dir.join("t.raw");
    let log = dir.join("writer.log");
    // Killed runs convert slowly (2 MiB/s) so 20 kills fit in the disk; the last one at full speed.
    let run = |rate: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostplane"));
        cmd.args([
            "convert",
            "offline",
            "--quiet",
            "--source-format",
            "qcow2",
            "--rate-mib",
            rate,
        ])
        .arg("--source")
        .arg(dir.join("over.qcow2"))
        .arg("--target")
        .arg(&target)
        .arg("--writer-log")
        .arg(&log)
        .args(["--writer-ops", "200", "--writer-qd", "4"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd
    };
    // A small deterministic generator for the kill instants (20–700 ms after start).
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut kills = 0;
    let mut finished_early = false;
    let t0 = Instant::now();
    for i in 0..n {
        let mut child = run("2").spawn().unwrap();
        let delay = 20 + rnd() % 680;
        std::thread::sleep(Duration::from_millis(delay));
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(
                st.success(),
                "run {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            println!("run {i} finished the conversion before its kill");
            finished_early = true;
            break;
        }
        // SIGKILL: no handler runs, nothing is flushed by the process.
        child.kill().unwrap();
        let _ = child.wait();
        kills += 1;
        let t = std::fs::read(&target).unwrap();
        let acked = check_acked(&t, &log);
        let map = PathBuf::from(format!("{}.convmap", target.display()));
        println!(
            "kill {i} after {delay} ms: {acked} acknowledged writes present, map {}",
            if map.exists() { "present" } else { "gone" }
        );
        if !map.exists() {
            finished_early = true;
            break;
        }
    }
    // Last run: to completion.
    if !finished_early {
        let out = run("0").output().unwrap();
        assert!(
            out.status.success(),
            "final run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("final run: {}", String::from_utf8_lossy(&out.stdout).trim());
    }
    let t = std::fs::read(&target).unwrap();
    let acked = check_acked(&t, &log);
    // Final image: source everywhere except where writes landed; unacknowledged writes (cut by
    // a kill) may or may not have landed, each wholly or partly — accept either content there.
    let mut reference = std::fs::read(dir.join("ref.raw")).unwrap();
    let (intents, acked_set) = read_log(&log);
    for (s, &(off, len)) in &intents {
        let r = off as usize..(off + len) as usize;
        if acked_set.contains(s) {
            reference[r].copy_from_slice(&pattern(*s, len as usize));
        } else {
            let p = pattern(*s, len as usize);
            for (k, sec) in (r.start..r.end).step_by(512).enumerate() {
                let got = &t[sec..sec + 512];
                let new = &p[k * 512..k * 512 + 512];
                assert!(
                    got == new || got == &reference[sec..sec + 512],
                    "write {s}: torn garbage"
                );
                reference[sec..sec + 512].copy_from_slice(got);
            }
        }
    }
    assert!(t == reference, "final image differs from source + writes");
    println!(
        "{kills} kills, {acked} acknowledged writes ({} intents), {:.1} s",
        intents.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        kills >= n.min(5),
        "only {kills} kills: the conversion finished too early"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
