//! Online conversion under VM IO: a QEMU TCG guest on a vhost-user-blk controller over a
//! `convert` bdev runs fio crc32c verify on a known range of its disk while the background
//! converter copies a qcow2 (with a backing file and zero clusters) into a raw target.
//!
//! Checks: the conversion was mid-way when fio started and reaches `done`; fio has 0 errors and
//! its verify passed; the guest's md5 of its whole disk (read through the convert bdev while the
//! conversion may still run) equals the md5 of the final target file; every byte of the target
//! outside fio's range equals a raw copy of the source, and every 4 KiB block inside it differs
//! (so the comparison can fail). Skipped when the guest images cannot be built.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::hostplane::Hostplane;
use guest::{job, Guest, GuestConfig};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 128 * MIB;
/// fio's range on /dev/vda: overlay data, backing data and unallocated clusters of the source.
const FIO_OFFSET: u64 = 80 * MIB;
const FIO_BYTES: u64 = 32 * MIB;
/// Background rate once resumed: the 128 MiB disk takes ~16 s, longer than the guest's fio.
const RATE_MIB: &str = "8";

fn sh(cmd: &str, args: &[&str], dir: &Path) -> String {
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
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bdev_convert_status` of one conversion.
fn status(hp: &Hostplane, name: &str) -> Value {
    let v = hp
        .rpc("bdev_convert_status", &["--name", name])
        .unwrap_or_else(|e| panic!("bdev_convert_status: {e}\n{}", hp.log_text()));
    v["conversions"][0].clone()
}

/// The stats of the test's one vhost controller.
fn ctrl_stats(hp: &Hostplane) -> Value {
    hp.rpc("vhost_get_controllers", &[])
        .map(|v| v[0]["stats"].clone())
        .unwrap_or_default()
}

/// One `bdev_convert_status` sample plus the controller's request counters, for the progress
/// printout (a stall shows whether the guest's requests wait in hostplane or never arrive).
fn sample(t: Duration, st: &Value, ctrl: &Value) -> String {
    format!(
        "+{:5.1}s {:>10} {:>4}/{} grains, vm_copies {} bg_copies {} reads_from_copy {}; \
         guest requests completed {} inflight {}",
        t.as_secs_f64(),
        st["state"].as_str().unwrap_or("?"),
        st["grains_done"],
        st["grains_total"],
        st["vm_copies"],
        st["bg_copies"],
        st["reads_from_copy"],
        ctrl["completed"],
        ctrl["inflight"]
    )
}

fn md5(path: &Path) -> String {
    let out = sh("md5sum", &[path.to_str().unwrap()], Path::new("/"));
    out.split_whitespace().next().unwrap_or("").to_string()
}

#[test]
fn qemu_guest_fio_verify_during_conversion() {
    let images = match guest::images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let t0 = Instant::now();
    let dir = common::temp_dir("convert-guest");

    // Source: 128 MiB qcow2 over a qcow2 backing file; data in both, a zero cluster over backing
    // data, unallocated ranges. fio's range (80–112 MiB) holds overlay data (84–92), backing data
    // (96–112) and unallocated clusters.
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "128M"],
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
            "-c",
            "write -P 0x55 96M 16M",
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
            "-c",
            "write -P 0x66 84M 8M",
            "-c",
            "write -P 0x77 120M 8M",
            "vm.qcow2",
        ],
        &dir,
    );
    sh(
        "qemu-img",
        &["convert", "-O", "raw", "vm.qcow2", "source.raw"],
        &dir,
    );
    let src = dir.join("vm.qcow2");
    let target = dir.join("vm.raw");

    // One storage reactor on lcore 1.
    let cfg = dir.join("hp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[eal]\nargs = {:?}\n\n[storage]\nlcores = \"1\"\n",
            common::eal_test_args("convert-guest")
        ),
    )
    .unwrap();
    let hp = Hostplane::start(&dir, &cfg, &[]);
    let st = hp.convert(
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
            RATE_MIB,
            "--no-wait",
        ],
    );
    assert_eq!(st["state"], "converting", "{st}");
    // Paused until the guest's fio runs, so the guest's writes meet unconverted grains.
    let st = hp.convert("pause", &["--name", "d0"]);
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(
        hp.rpc(
            "vhost_create_blk_controller",
            &["--ctrlr", "vm-conv0", "--dev-name", "d0"]
        ),
        Ok(Value::Bool(true)),
        "{}",
        hp.log_text()
    );

    let script = [
        job::disk_info("vda"),
        job::mark("fio.started"),
        job::fio(
            "fio.v",
            &format!(
                "--name=v --filename=/dev/vda --ioengine=libaio --iodepth=16 --direct=1 \
                 --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 --offset={} --size={} \
                 --loops=2",
                FIO_OFFSET, FIO_BYTES
            ),
        ),
        job::mark("fio.done"),
        // The whole disk as the guest sees it, read through the convert bdev (unconverted grains
        // are copied on the way) while the background may still be converting.
        job::result(
            "disk.md5",
            "\"$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)\"",
        ),
    ]
    .concat();
    let t_launch = Instant::now();
    let mut g = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![dir.join("vm-conv0")],
            num_queues: 2,
            smp: 2,
            job: script,
            timeout: Duration::from_secs(180),
            ..Default::default()
        },
    )
    .expect("launch guest");
    g.wait_for_result("fio.started", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("guest: {e}\n--- hostplane ---\n{}", hp.log_text()));
    let boot = t_launch.elapsed();
    let at_fio = status(&hp, "d0");
    assert_eq!(at_fio["state"], "paused", "{at_fio}");
    let total = at_fio["grains_total"].as_u64().unwrap();
    assert_eq!(total, DISK_BYTES / 65536, "{at_fio}");
    assert!(
        at_fio["grains_done"].as_u64().unwrap() < total / 4,
        "conversion not finished (nor far along) when fio started: {at_fio}"
    );
    let resumed = Instant::now();
    let st = hp.convert("resume", &["--name", "d0"]);
    assert_eq!(st["state"], "converting", "{st}");

    // Progress while the guest's fio runs, then until the conversion is done.
    let mut samples = vec![sample(Duration::ZERO, &at_fio, &ctrl_stats(&hp))];
    let mut fio_done_at: Option<(Duration, Value)> = None;
    let deadline = Instant::now() + Duration::from_secs(150);
    // Sampled until both the conversion and the guest's fio have finished (or the guest is gone).
    let mut done: Option<(Duration, Value)> = None;
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let t = resumed.elapsed();
        let report = g.report();
        let c = ctrl_stats(&hp);
        let st = match &done {
            None => {
                let st = status(&hp, "d0");
                samples.push(sample(t, &st, &c));
                st
            }
            Some((_, st)) => {
                samples.push(format!(
                    "+{:5.1}s guest requests completed {} inflight {}",
                    t.as_secs_f64(),
                    c["completed"],
                    c["inflight"]
                ));
                st.clone()
            }
        };
        if fio_done_at.is_none() && report.get("fio.done").is_some() {
            samples.push(format!("+{:5.1}s guest fio finished", t.as_secs_f64()));
            fio_done_at = Some((t, st.clone()));
        }
        if done.is_none() && st["state"] == "done" {
            done = Some((t, st));
        }
        if done.is_some() && (fio_done_at.is_some() || report.done) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "conversion or guest fio not done in 150 s:\n{}",
            samples.join("\n")
        );
    }
    let (converted_in, done) = done.unwrap();
    println!("conversion progress (from the guest's fio start):");
    for s in &samples {
        println!("  {s}");
    }
    let out = g
        .wait()
        .unwrap_or_else(|e| panic!("guest run: {e}\n--- hostplane ---\n{}", hp.log_text()));
    let fio_end = fio_done_at.map(|(t, st)| (t, st["grains_done"].as_u64().unwrap_or(0)));

    // The guest: right disk, clean fio with verify.
    let disk = out.disk("vda").expect("disk info");
    println!("guest disk vda: {disk}");
    assert_eq!(disk.sectors * 512, DISK_BYTES);
    assert_eq!(disk.serial, "vm-conv0");
    let fio = out
        .fio("fio.v")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    fio.assert_clean();
    assert_eq!(fio.rc, 0);
    // Two loops of writes over the range, each read back and verified.
    assert_eq!(fio.write_bytes(), 2 * FIO_BYTES, "{:?}", fio.jobs);
    assert_eq!(
        fio.read_bytes(),
        2 * FIO_BYTES,
        "verify reads: {:?}",
        fio.jobs
    );

    // The conversion: done, no errors; the guest's writes met unconverted grains.
    assert_eq!(done["grains_done"], done["grains_total"], "{done}");
    assert_eq!(done["errors"], 0, "{done}");
    assert!(done["vm_copies"].as_u64() > Some(0), "{done}");
    assert!(done["bg_copies"].as_u64() > Some(0), "{done}");
    assert!(
        !dir.join("vm.raw.convmap").exists(),
        "map deleted when done"
    );
    let ctrl = ctrl_stats(&hp);
    let (ok, log) = hp.stop();
    assert!(ok, "hostplane run failed:\n{log}");

    // What the guest read of its whole disk is the final target.
    let guest_md5 = out.require("disk.md5").unwrap().trim().to_string();
    assert_eq!(guest_md5, md5(&target), "guest's whole-disk md5 vs target");

    // Outside fio's range the target equals the source; inside, every 4 KiB block differs.
    let got = std::fs::read(&target).unwrap();
    let want = std::fs::read(dir.join("source.raw")).unwrap();
    assert_eq!(got.len() as u64, DISK_BYTES);
    assert_eq!(want.len() as u64, DISK_BYTES);
    let (lo, hi) = (FIO_OFFSET as usize, (FIO_OFFSET + FIO_BYTES) as usize);
    for (name, range) in [("below", 0..lo), ("above", hi..got.len())] {
        if let Some(i) = range.clone().find(|&i| got[i] != want[i]) {
            panic!(
                "target differs from the source {name} fio's range at byte {i} ({:#x} vs {:#x})",
                got[i], want[i]
            );
        }
    }
    let same = got[lo..hi]
        .chunks(4096)
        .zip(want[lo..hi].chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(
        same, 0,
        "4 KiB blocks in fio's range still equal to the source (fio writes every block)"
    );

    let bg = done["bg_copies"].as_u64().unwrap_or(0);
    let vm = done["vm_copies"].as_u64().unwrap_or(0);
    println!(
        "guest boot + fio start {:.1} s; fio: 0 errors, wrote {} MiB, verified {} MiB, max latency \
         {:?}; guest fio finished {}; conversion done {:.1} s after fio started ({} grains: {vm} \
         VM-triggered copies, {bg} background copies, rate {RATE_MIB} MiB/s); controller: {}; \
         target == source outside [{}M, {}M), all {} blocks inside differ; total {:.1} s",
        boot.as_secs_f64(),
        fio.write_bytes() >> 20,
        fio.read_bytes() >> 20,
        fio.max_lat(),
        match fio_end {
            Some((t, g)) => format!("+{:.1} s with {g}/{total} grains converted", t.as_secs_f64()),
            None => "after the conversion".into(),
        },
        converted_in.as_secs_f64(),
        total,
        ctrl,
        FIO_OFFSET >> 20,
        (FIO_OFFSET + FIO_BYTES) >> 20,
        FIO_BYTES / 4096,
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
