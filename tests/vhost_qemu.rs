//! hostplane's vhost-user-blk under a real QEMU 7.2 guest (TCG).
//!
//! `qemu_guest_on_hostplane_run_bdevs`: a `hostplane run` process (EAL, one storage reactor on
//! lcore 1, no ports) serves a malloc bdev (controller declared in the config), a file bdev and a
//! read-only malloc bdev (controllers created over JSON-RPC) to one guest with two queues per
//! disk: the guest sees the right sizes and serials, fio crc32c verify runs clean on both
//! writable disks, data the guest wrote to the file bdev is byte-exact in the host file, and the
//! read-only disk reads but refuses writes.
//!
//! `hostplane_run_restores_controllers_from_saved_config`: save_config → restart with `--json`.
//!
//! `qemu_guest_survives_hostplane_kill_and_restart`: `hostplane run` killed -9 twice under the
//! guest's fio verify on a file bdev, restarted from its config: 0 guest errors.
//!
//! `qemu_guest_fio_on_rbd_across_osd_outage`: an rbd bdev made with `bdev_rbd_create` on a
//! one-node Ceph cluster, served over vhost-user-blk: fio verify in the guest with the OSD stopped
//! for 5 s mid-run sees no error (skipped when Ceph cannot be installed).
//!
//! `qemu_guest_survives_backend_restarts`: one controller on the in-memory `MemTarget`, polled
//! by a test thread, "crashed" and restarted three times under fio verify: QEMU reconnects with
//! the inflight region and the guest sees no error.

mod ceph;
mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::hostplane::Hostplane;
use guest::{job, Guest, GuestConfig};
use hostplane::storage::vhost::{MemTarget, VhostBlkController, VhostBlkControllerConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 64 << 20;
const RO_BYTES: u64 = 16 << 20;
const BS: u32 = 512;
const PATTERN_OFFSET: u64 = 48 << 20;
const PATTERN_BYTES: usize = 64 << 10;

enum Cmd {
    /// Crash-like restart: drop what the target holds, drop the controller, wait, listen again.
    Restart(Duration),
    Stop,
}

#[derive(Debug, Default)]
struct Counts {
    completed: u64,
    /// Requests lost in the simulated crashes.
    aborted: u64,
    /// Requests the restarted back-end resubmitted from the inflight region.
    resubmitted: u64,
}

/// One controller on its own polling thread (as on a reactor), with a disk that outlives restarts.
struct Backend {
    tx: mpsc::Sender<Cmd>,
    join: Option<std::thread::JoinHandle<Counts>>,
}

impl Backend {
    fn start(name: &str, socket: &Path, readonly: bool, queues: u16) -> Backend {
        let _ = env_logger::builder().is_test(true).try_init();
        let (tx, rx) = mpsc::channel();
        let cfg = VhostBlkControllerConfig {
            name: name.to_string(),
            socket_path: socket.to_path_buf(),
            readonly,
            num_queues: queues,
        };
        let join = std::thread::spawn(move || {
            let disk = MemTarget::new(BS, DISK_BYTES / u64::from(BS));
            let make = |d: &MemTarget| {
                VhostBlkController::new(cfg.clone(), Box::new(d.clone())).expect("controller")
            };
            let mut ctrl = Some(make(&disk));
            let mut completed = 0;
            let (mut aborted, mut resubmitted) = (0u64, 0u64);
            loop {
                match rx.try_recv() {
                    Ok(Cmd::Restart(pause)) => {
                        // Let requests pile up at the target first, so the crash catches some
                        // in flight (fetched, marked inflight, never completed).
                        disk.set_auto(false);
                        let hold = Instant::now();
                        while hold.elapsed() < Duration::from_millis(100) {
                            if let Some(c) = ctrl.as_mut() {
                                c.poll();
                            }
                        }
                        let lost = disk.abort_pending();
                        if let Some(c) = ctrl.take() {
                            let st = c.stats();
                            completed += st.completed;
                            resubmitted += st.resubmitted;
                        }
                        aborted += lost as u64;
                        std::thread::sleep(pause);
                        disk.set_auto(true);
                        ctrl = Some(make(&disk));
                    }
                    Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        let st = ctrl.map(|c| c.stats()).unwrap_or_default();
                        return Counts {
                            completed: completed + st.completed,
                            aborted,
                            resubmitted: resubmitted + st.resubmitted,
                        };
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                let work = ctrl.as_mut().map_or(0, |c| c.poll());
                if work == 0 {
                    // TCG guests need the CPU more than an idle poller does.
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        let until = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < until, "socket did not appear");
            std::thread::sleep(Duration::from_millis(5));
        }
        Backend {
            tx,
            join: Some(join),
        }
    }

    fn stop(mut self) -> Counts {
        let _ = self.tx.send(Cmd::Stop);
        self.join
            .take()
            .map(|j| j.join().unwrap())
            .unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hp-vhost-qemu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect()
}

/// A config with one VM: `vm1/boot` (malloc, controller `vm1-disk0` declared here), `vm1/data`
/// (file) and `vm1/golden` (malloc).
fn write_config(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("vm1-data.img");
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
name = "boot"
system = "malloc"
params = {{ size_mib = {mib} }}
vhost = "vm1-disk0"
[[vm.disk]]
name = "data"
system = "file"
params = {{ path = "{data}", size_mib = {mib} }}
[[vm.disk]]
name = "golden"
system = "malloc"
params = {{ size_mib = {ro_mib} }}
"#,
            eal = common::eal_test_args(name),
            mib = DISK_BYTES >> 20,
            ro_mib = RO_BYTES >> 20,
            data = data.display()
        ),
    )
    .unwrap();
    (config, data)
}

/// save_config → restart with `--json`: the controllers come back (the one the config declares
/// is created by both, which is allowed with the same params). No guest needed.
#[test]
fn hostplane_run_restores_controllers_from_saved_config() {
    let dir = scratch("saved");
    let (config, _) = write_config(&dir, "vhost-saved");
    let hp = Hostplane::start(&dir, &config, &[]);
    assert_eq!(
        hp.rpc(
            "vhost_create_blk_controller",
            &[
                "--ctrlr",
                "vm1-ro",
                "--dev-name",
                "vm1/golden",
                "--readonly"
            ]
        ),
        Ok(Value::Bool(true))
    );
    let e = hp
        .rpc(
            "vhost_create_blk_controller",
            &["--ctrlr", "vm1-x", "--dev-name", "vm1/golden"],
        )
        .unwrap_err();
    assert!(e.contains("already served by controller \"vm1-ro\""), "{e}");
    let saved = dir.join("saved.json");
    let r = hp
        .rpc("save_config", &["--file", saved.to_str().unwrap()])
        .unwrap();
    // The bdev subsystem saves its own calls (VM disks, QoS); the controllers are two.
    let text = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(
        text.matches("\"vhost_create_blk_controller\"").count(),
        2,
        "{r}: {text}"
    );
    let before = hp.rpc("vhost_get_controllers", &[]).unwrap();
    let (ok, log) = hp.stop();
    assert!(ok, "{log}");
    assert!(!dir.join("vm1-ro").exists());

    let hp = Hostplane::start(&dir, &config, &["--json", saved.to_str().unwrap()]);
    let after = hp.rpc("vhost_get_controllers", &[]).unwrap();
    let names = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| (c["ctrlr"].clone(), c["backend_specific"].clone()))
            .collect()
    };
    assert_eq!(names(&after), names(&before));
    assert!(dir.join("vm1-disk0").exists() && dir.join("vm1-ro").exists());
    let (ok, log) = hp.stop();
    assert!(ok, "{log}");
    // The two controller calls, plus the bdev subsystem's own (the VM's disks).
    assert!(log.contains("--json: replayed 4 calls"), "{log}");
}

/// A guest (two queues, two vCPUs) running `before`, then fio crc32c verify on vda as `fio.v`
/// (randwrite 4k, iodepth 16, 24 MiB twice); returns once fio has started, so the test can break
/// things under it.
fn guest_under_fio(images: &guest::GuestImages, socket: PathBuf, before: &str) -> Guest {
    let script = [
        before.to_string(),
        job::mark("fio.started"),
        job::fio(
            "fio.v",
            "--name=v --filename=/dev/vda --ioengine=libaio --iodepth=16 --direct=1 \
             --rw=randwrite --bs=4k --verify=crc32c --do_verify=1 --size=24M --loops=2",
        ),
    ]
    .concat();
    let mut g = Guest::launch(
        images,
        GuestConfig {
            vhost_sockets: vec![socket],
            num_queues: 2,
            smp: 2,
            job: script,
            timeout: Duration::from_secs(300),
            ..Default::default()
        },
    )
    .expect("launch guest");
    g.wait_for_result("fio.started", Duration::from_secs(90))
        .expect("fio start");
    g
}

fn images() -> Option<guest::GuestImages> {
    match guest::images() {
        Ok(i) => Some(i),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

#[test]
fn qemu_guest_on_hostplane_run_bdevs() {
    let Some(images) = images() else { return };
    let dir = scratch("run");
    let (config, data) = write_config(&dir, "vhost-qemu");
    let hp = Hostplane::start(&dir, &config, &[]);
    // vda: declared in the config. vdb and vdc: created over JSON-RPC.
    assert!(dir.join("vm1-disk0").exists(), "{}", hp.log_text());
    let e = hp
        .rpc(
            "vhost_create_blk_controller",
            &["--ctrlr", "x", "--dev-name", "vm1/data", "--packed-ring"],
        )
        .unwrap_err();
    assert!(e.contains("packed_ring") && e.contains("-32602"), "{e}");
    for args in [
        &[
            "--ctrlr",
            "vm1-disk1",
            "--dev-name",
            "vm1/data",
            "--cpumask",
            "0x2",
        ][..],
        &[
            "--ctrlr",
            "vm1-ro",
            "--dev-name",
            "vm1/golden",
            "--readonly",
        ][..],
    ] {
        assert_eq!(
            hp.rpc("vhost_create_blk_controller", args),
            Ok(Value::Bool(true)),
            "{}",
            hp.log_text()
        );
    }
    let sockets: Vec<PathBuf> = ["vm1-disk0", "vm1-disk1", "vm1-ro"]
        .iter()
        .map(|n| dir.join(n))
        .collect();

    let fio = |name: &str, dev: &str, rw: &str| {
        job::fio(
            name,
            &format!(
                "--name=j --filename=/dev/{dev} --ioengine=libaio --iodepth=16 --direct=1 \
                 --verify=crc32c --do_verify=1 --size=16M {rw}"
            ),
        )
    };
    let mixed = "--rw=randrw --rwmixread=50 --bssplit=4k/50:16k/30:64k/20 --offset=16M";
    let script = [
        job::disk_info("vda"),
        job::disk_info("vdb"),
        job::disk_info("vdc"),
        fio("fio.malloc.randwrite", "vda", "--rw=randwrite --bs=4k"),
        fio("fio.malloc.mixed", "vda", mixed),
        fio("fio.file.randwrite", "vdb", "--rw=randwrite --bs=4k"),
        fio("fio.file.mixed", "vdb", mixed),
        job::write_file_at("dd.pattern", "/pattern.bin", "vdb", PATTERN_OFFSET),
        job::run(
            "ro.read",
            "dd if=/dev/vdc of=/dev/null bs=64k count=16 iflag=direct",
        ),
        job::write_file_at("ro.write", "/pattern.bin", "vdc", 0),
    ]
    .concat();
    let want = pattern(PATTERN_BYTES);
    let out = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: sockets.clone(),
            num_queues: 2,
            smp: 2,
            job: script,
            files: vec![("/pattern.bin".into(), want.clone())],
            timeout: Duration::from_secs(300),
            ..Default::default()
        },
    )
    .expect("launch guest")
    .wait()
    .unwrap_or_else(|e| panic!("guest run: {e}\n--- hostplane ---\n{}", hp.log_text()));

    for (dev, bytes, serial, ro) in [
        ("vda", DISK_BYTES, "vm1-disk0", false),
        ("vdb", DISK_BYTES, "vm1-disk1", false),
        ("vdc", RO_BYTES, "vm1-ro", true),
    ] {
        let disk = out.disk(dev).expect("disk info");
        println!("guest disk {dev}: {disk}");
        assert_eq!(disk.sectors * 512, bytes, "{dev}");
        assert_eq!(disk.serial, serial, "{dev}");
        assert_eq!(disk.read_only, ro, "{dev}");
        assert_eq!(disk.queues, 2, "{dev}");
    }
    for name in [
        "fio.malloc.randwrite",
        "fio.malloc.mixed",
        "fio.file.randwrite",
        "fio.file.mixed",
    ] {
        let fio = out
            .fio(name)
            .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
        fio.assert_clean();
        println!(
            "{name}: 0 errors, wrote {} KiB, read {} KiB",
            fio.write_bytes() >> 10,
            fio.read_bytes() >> 10
        );
    }
    // What the guest wrote to the file bdev is in the host file, byte for byte.
    assert_eq!(out.int("dd.pattern.rc").ok(), Some(0), "{:?}", out.blobs);
    let host = std::fs::read(&data).unwrap();
    let at = PATTERN_OFFSET as usize;
    assert!(
        host[at..at + PATTERN_BYTES] == want[..],
        "host file differs from what the guest wrote"
    );
    // Read-only: reads work, writes fail.
    assert_eq!(out.int("ro.read.rc").ok(), Some(0), "{:?}", out.blobs);
    assert_ne!(out.int("ro.write.rc").ok(), Some(0), "write must fail");

    // The controllers as SPDK tooling sees them.
    let list = hp.rpc("vhost_get_controllers", &[]).unwrap();
    println!("vhost_get_controllers: {list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for c in list {
        assert_eq!(c["cpumask"], "0x2", "the reactor on lcore 1");
        assert_eq!(c["socket"], json!(dir.join(c["ctrlr"].as_str().unwrap())));
        assert!(c["stats"]["connections"].as_u64() >= Some(1), "{c}");
        assert_eq!(c["stats"]["resets"], 0, "{c}");
    }
    for (i, bdev) in [(0, "vm1/boot"), (1, "vm1/data")] {
        assert_eq!(list[i]["backend_specific"]["block"]["bdev"], bdev);
        assert!(
            list[i]["stats"]["completed"].as_u64() > Some(4000),
            "{}",
            list[i]
        );
    }
    assert_eq!(list[2]["backend_specific"]["block"]["readonly"], true);
    if guest::have_program("spdk-rpc") {
        let out = Command::new("spdk-rpc")
            .arg("-s")
            .arg(&hp.rpc)
            .arg("vhost_get_controllers")
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(3), "spdk-rpc: {v}");
    }
    let saved = hp.rpc("save_config", &[]).unwrap();
    let vhost = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "vhost_blk")
        .expect("vhost_blk subsystem");
    assert_eq!(vhost["config"].as_array().unwrap().len(), 3, "{vhost}");
    assert_eq!(
        vhost["config"][2],
        json!({"method": "vhost_create_blk_controller", "params":
            {"ctrlr": "vm1-ro", "dev_name": "vm1/golden", "readonly": true, "cpumask": "0x2"}})
    );
    // QEMU is gone: a controller can be deleted, its socket goes with it.
    assert_eq!(
        hp.rpc("vhost_delete_controller", &["--ctrlr", "vm1-ro"]),
        Ok(Value::Bool(true))
    );
    assert!(!sockets[2].exists());
    let (ok, log) = hp.stop();
    assert!(ok, "hostplane run failed:\n{log}");
    assert!(log.contains("disk vm1/data [file] reactor 0"), "{log}");
    assert!(
        !sockets[0].exists() && !sockets[1].exists(),
        "sockets removed at exit"
    );
}

/// `hostplane run` is killed (-9) twice while the guest runs fio verify on a file bdev, and
/// restarted from the same config: its controller comes back on the stale socket, QEMU
/// reconnects, requests that were in flight are resubmitted from the inflight region, and the
/// guest sees no error.
#[test]
fn qemu_guest_survives_hostplane_kill_and_restart() {
    let Some(images) = images() else { return };
    let dir = scratch("kill");
    let data = dir.join("disk.img");
    let config = dir.join("hostplane.toml");
    std::fs::write(
        &config,
        format!(
            "[eal]\nargs = {eal:?}\n\n[[vm]]\nname = \"vm1\"\n[[vm.disk]]\nname = \"root\"\n\
             system = \"file\"\nvhost = \"vm1-root\"\nparams = {{ path = \"{data}\", size_mib = 64 }}\n",
            eal = common::eal_test_args("vhost-kill"),
            data = data.display()
        ),
    )
    .unwrap();
    let mut hp = Some(Hostplane::start(&dir, &config, &[]));
    let g = guest_under_fio(&images, dir.join("vm1-root"), "");
    let mut resubmitted = 0;
    for i in 0..2 {
        std::thread::sleep(Duration::from_millis(2000));
        if let Some(h) = hp.take() {
            h.kill();
        }
        let t = Instant::now();
        let h = Hostplane::start(&dir, &config, &[]);
        println!(
            "kill {i}: hostplane answering again after {:?}",
            t.elapsed()
        );
        // Wait for QEMU's reconnect, then read what the new process resubmitted.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let l = h.rpc("vhost_get_controllers", &[]).unwrap();
            if l[0]["stats"]["completed"].as_u64() > Some(0) {
                resubmitted += l[0]["stats"]["resubmitted"].as_u64().unwrap_or(0);
                break;
            }
            assert!(Instant::now() < until, "no IO after restart {i}: {l}");
            std::thread::sleep(Duration::from_millis(100));
        }
        hp = Some(h);
    }
    let out = g.wait().unwrap_or_else(|e| {
        panic!(
            "guest run: {e}\n--- hostplane ---\n{}",
            hp.as_ref().map(|h| h.log_text()).unwrap_or_default()
        )
    });
    let fio = out
        .fio("fio.v")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    fio.assert_clean();
    println!(
        "fio through 2 kill -9 restarts: 0 errors, wrote {} KiB, max latency {:?}, \
         {resubmitted} requests resubmitted (at the moment of the first IO after restart)",
        fio.write_bytes() >> 10,
        fio.max_lat()
    );
    if let Some(h) = hp {
        let (ok, log) = h.stop();
        assert!(ok, "{log}");
    }
}

/// An rbd bdev created over RPC, served over vhost-user-blk: the guest's fio verify runs across a
/// 5 s OSD outage (requests are held by the rbd backend, not failed) with 0 errors.
#[test]
fn qemu_guest_fio_on_rbd_across_osd_outage() {
    let Some(images) = images() else { return };
    let Some(mut cl) = ceph::Cluster::start("vhost") else {
        return;
    };
    cl.cli("rbd", &["create", "rbd/vm", "--size", "64M"]);
    let dir = scratch("rbd");
    let config = dir.join("hostplane.toml");
    std::fs::write(
        &config,
        format!(
            "[eal]\nargs = {:?}\n\n[storage]\nlcores = \"1\"\n",
            common::eal_test_args("vhost-rbd")
        ),
    )
    .unwrap();
    let hp = Hostplane::start(&dir, &config, &[]);
    let conf = cl.conf.to_str().unwrap().to_string();
    let created = hp.rpc(
        "bdev_rbd_create",
        &[
            "--name",
            "Ceph0",
            "--pool-name",
            "rbd",
            "--rbd-name",
            "vm",
            "--block-size",
            "512",
            "--config-file",
            &conf,
            "--io-timeout-ms",
            "60000",
        ],
    );
    assert_eq!(created, Ok(json!("Ceph0")), "{}", hp.log_text());
    assert_eq!(
        hp.rpc(
            "vhost_create_blk_controller",
            &["--ctrlr", "vm-rbd0", "--dev-name", "Ceph0"]
        ),
        Ok(Value::Bool(true))
    );
    let g = guest_under_fio(&images, dir.join("vm-rbd0"), &job::disk_info("vda"));
    std::thread::sleep(Duration::from_millis(1500));
    cl.stop_osd();
    std::thread::sleep(Duration::from_secs(5));
    cl.start_osd();
    println!("OSD stopped for 5 s under the guest's fio");
    let out = g
        .wait()
        .unwrap_or_else(|e| panic!("guest run: {e}\n--- hostplane ---\n{}", hp.log_text()));
    let disk = out.disk("vda").expect("disk info");
    assert_eq!((disk.sectors, disk.serial.as_str()), (131072, "vm-rbd0"));
    let fio = out
        .fio("fio.v")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    fio.assert_clean();
    println!(
        "fio on rbd across a 5 s OSD outage: 0 errors, wrote {} KiB, max latency {:?}",
        fio.write_bytes() >> 10,
        fio.max_lat()
    );
    let (ok, log) = hp.stop();
    assert!(ok, "{log}");
}

/// The back-end is "crashed" (its pending requests dropped, socket closed) and restarted three
/// times under fio verify; QEMU reconnects with the inflight region and the guest sees no error.
#[test]
fn qemu_guest_survives_backend_restarts() {
    let Some(images) = images() else { return };
    let dir = scratch("restart");
    let socket = dir.join("vhost.r");
    let be = Backend::start("hp-restart", &socket, false, 2);
    let g = guest_under_fio(&images, socket.clone(), "");
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let t = Instant::now();
        be.tx
            .send(Cmd::Restart(Duration::from_millis(300)))
            .unwrap();
        println!("restart {i} requested at +{:?}", t.elapsed());
    }
    let out = g.wait().unwrap_or_else(|e| panic!("guest run: {e}"));
    let fio = out
        .fio("fio.v")
        .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
    fio.assert_clean();
    let counts = be.stop();
    println!("requests: {counts:?}");
    assert!(counts.completed > 1000, "{counts:?}");
    assert!(counts.aborted > 0, "the crashes caught requests in flight");
    assert_eq!(
        counts.resubmitted, counts.aborted,
        "each lost request resubmitted once"
    );
    println!(
        "fio through 3 restarts: 0 errors, wrote {} KiB, max latency {:?}",
        fio.write_bytes() >> 10,
        fio.max_lat()
    );
}
