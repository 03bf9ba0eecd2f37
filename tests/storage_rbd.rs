//! The rbd backend against a real one-node Ceph cluster (tests/ceph): data integrity, the same
//! bytes seen by `rbd export`, a bdev restart, the OSD stopped for 5 s under IO (requests held,
//! nothing failed), an image shrunk underneath (that bdev fails, the other keeps working), an
//! unreachable cluster (error names the monitor), and `hostplane bench bdev --rbd-bench`.
//! Each test prints "skipped: ..." and passes when the Ceph packages cannot be installed.

mod ceph;
mod common;

use hostplane::control::methods::rbd::{self as rbd_methods, RbdBdevs};
use hostplane::storage::ceph::Cluster as CephCluster;
use hostplane::storage::client::{compare, verify_patterns, BdevClient, Op};
use hostplane::storage::reactor::{ReactorOptions, ReactorSet};
use hostplane::storage::routing::{Routing, VmFile};
use hostplane::storage::{BackendRegistry, IoStatus};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 << 20;

fn params(c: &ceph::Cluster, image: &str) -> serde_json::Value {
    json!({"pool_name": "rbd", "rbd_name": image, "config_file": c.conf.to_str().unwrap(),
           "block_size": 512, "io_timeout_ms": 60000})
}

#[test]
fn rbd_end_to_end() {
    let Some(mut cl) = ceph::Cluster::start("e2e") else {
        return;
    };
    let size = format!("{}M", SIZE >> 20);
    cl.cli("rbd", &["create", "rbd/a", "--size", &size]);
    cl.cli("rbd", &["create", "rbd/b", "--size", &size]);
    let reg = BackendRegistry::with_builtin();
    let a = reg
        .create("rbd", "a", &params(&cl, "a"), false)
        .expect("create rbd bdev a");
    let b = reg
        .create("rbd", "b", &params(&cl, "b"), false)
        .expect("create rbd bdev b");
    assert_eq!(
        CephCluster::live(),
        1,
        "bdevs of one cluster share a handle"
    );
    assert_eq!(a.info().size(), SIZE);

    // Integrity on two reactors.
    let set = ReactorSet::spawn_threads(2, ReactorOptions::polite()).unwrap();
    let c0 = Arc::new(BdevClient::open(&set.handle(0).unwrap(), &a).unwrap());
    let c1 = BdevClient::open(&set.handle(1).unwrap(), &a).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let rep = verify_patterns(&c0, &mut model, 7, 8, 32, 256, true).expect("integrity");
    println!("integrity: {rep:?}");
    assert_eq!(compare(&c1, &model).unwrap(), SIZE);

    // The OSD stopped for 5 s mid-run: the writer sees no error, a request issued while the
    // OSD is down is held and completes after it is back.
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (c0.clone(), stop.clone());
    let span = (SIZE - (1 << 20)) as usize;
    let mut m = model[..span].to_vec();
    let writer = std::thread::spawn(move || {
        let (mut seed, mut batches) = (100, 0u32);
        while !s.load(Ordering::Relaxed) {
            if let Err(e) = verify_patterns(&c, &mut m, seed, 2, 16, 64, false) {
                return Err(format!("after {batches} batches: {e}"));
            }
            seed += 1;
            batches += 1;
        }
        Ok((m, batches))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    cl.stop_osd();
    println!("OSD stopped in {:?}", t0.elapsed());
    let held = c1.submit(Op::Write {
        offset: span as u64,
        data: vec![0xc5; 4096],
    });
    std::thread::sleep(Duration::from_secs(5).saturating_sub(t0.elapsed()));
    assert!(
        held.try_recv().is_err(),
        "a request completed while the OSD was down"
    );
    cl.start_osd();
    let t1 = Instant::now();
    let (st, _) = held
        .recv_timeout(Duration::from_secs(60))
        .expect("held request completed after the OSD came back");
    assert_eq!(st, IoStatus::Success);
    println!(
        "held request completed {:?} after the OSD restart",
        t1.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (m, batches) = writer
        .join()
        .unwrap()
        .expect("no IO failed across the outage");
    println!("writer: {batches} verified batches across the outage");
    model[..span].copy_from_slice(&m);
    model[span..span + 4096].fill(0xc5);
    assert_eq!(compare(&c0, &model).unwrap(), SIZE);
    assert_eq!(a.iostat().io_error.total(), 0, "{:?}", a.iostat());

    // Restart the bdev (close the image and the cluster handle, open again): same bytes.
    drop(c0);
    drop(c1);
    drop(set);
    drop(a);
    let a = reg.create("rbd", "a", &params(&cl, "a"), false).unwrap();
    let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
    let c = BdevClient::open(&set.handle(0).unwrap(), &a).unwrap();
    assert_eq!(compare(&c, &model).unwrap(), SIZE);
    drop(c);
    drop(a);

    // Another client reads the image: byte-exact.
    let img = cl.dir.join("a.raw");
    cl.cli("rbd", &["export", "rbd/a", img.to_str().unwrap()]);
    assert!(
        std::fs::read(&img).unwrap() == model,
        "rbd export differs from what was written"
    );

    // b shrunk underneath: b fails with ENODEV (after the watch fires), a new bdev on a is fine.
    let cb = BdevClient::open(&set.handle(0).unwrap(), &b).unwrap();
    assert_eq!(cb.write(0, &[1; 4096]), IoStatus::Success);
    cl.cli(
        "rbd",
        &["resize", "rbd/b", "--size", "16M", "--allow-shrink"],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match cb.write(0, &[2; 4096]) {
            IoStatus::IoError(e) if e == libc::ENODEV => break,
            st if Instant::now() < deadline => {
                assert_eq!(st, IoStatus::Success);
                std::thread::sleep(Duration::from_millis(100));
            }
            st => panic!("shrunk image still served: {st:?}"),
        }
    }
    let a = reg.create("rbd", "a2", &params(&cl, "a"), false).unwrap();
    let ca = BdevClient::open(&set.handle(0).unwrap(), &a).unwrap();
    assert_eq!(ca.read(0, 4096).unwrap(), model[..4096].to_vec());
    drop(ca);

    // SPDK's RPC, with a key/value config instead of the file: its own cluster handle.
    let mut rpc = hostplane::control::registry::Registry::new();
    let table = Arc::new(RbdBdevs::default());
    rbd_methods::register(&mut rpc, table.clone());
    let name = rpc
        .call(
            "bdev_rbd_create",
            json!({"pool_name": "rbd", "rbd_name": "a", "block_size": 4096, "user_id": null,
                   "config": {"mon_host": cl.mon_host(), "auth_client_required": "none"},
                   "uuid": null}),
        )
        .expect("bdev_rbd_create");
    assert_eq!(name, json!("Ceph0"));
    let r = table.get("Ceph0").unwrap();
    assert_eq!((r.info().block_size, r.info().size()), (4096, SIZE));
    assert_eq!(CephCluster::live(), 2);
    assert_eq!(table.config_calls()[0].params["rbd_name"], "a");
    drop(r);
    assert_eq!(
        rpc.call("bdev_rbd_delete", json!({"name": "Ceph0"}))
            .unwrap(),
        json!(true)
    );
    assert_eq!(CephCluster::live(), 1);

    // Per-VM config naming rbd disks: a missing image fails alone, with its name.
    let conf = cl.conf.display().to_string();
    let vms: VmFile = toml::from_str(&format!(
        "[[vm]]\nname = \"vm1\"\n[[vm.disk]]\nname = \"root\"\nsystem = \"rbd\"\n\
         params = {{ pool_name = \"rbd\", rbd_name = \"a\", config_file = \"{conf}\" }}\n\
         [[vm.disk]]\nname = \"gone\"\nsystem = \"rbd\"\n\
         params = {{ pool = \"rbd\", image = \"nosuch\", config_file = \"{conf}\" }}\n"
    ))
    .unwrap();
    let routing = Routing::build(&vms.vms, &reg, 1);
    let (root, _) = routing.route("vm1", "root").expect("rbd disk routed");
    assert_eq!(root.info().size(), SIZE);
    let e = routing.failed().next().unwrap().bdev.as_ref().unwrap_err();
    assert!(e.contains("rbd/nosuch"), "{e}");
    drop(routing);
    drop(cb);
    drop(set);
    drop(a);
    drop(b);
    assert_eq!(
        CephCluster::live(),
        0,
        "the cluster handle closes with its last bdev"
    );
    let took = cl.stop();
    println!("cluster stopped in {took:?}");
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
}

#[test]
fn unreachable_cluster_names_the_monitor() {
    if !std::path::Path::new("/usr/include/rbd/librbd.h").exists() {
        println!("skipped: librbd not installed");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mon = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let e = BackendRegistry::with_builtin()
        .create(
            "rbd",
            "x",
            &json!({"pool_name": "rbd", "rbd_name": "x", "mon_host": mon,
                    "config": {"auth_client_required": "none"}, "connect_timeout_ms": 2000}),
            false,
        )
        .unwrap_err()
        .to_string();
    println!("{e} (after {:?})", t0.elapsed());
    assert!(e.contains(&mon), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn bench_against_rbd_bench() {
    let Some(cl) = ceph::Cluster::start("bench") else {
        return;
    };
    cl.cli("rbd", &["create", "rbd/bench", "--size", "256M"]);
    let spec = format!(
        "rbd:pool=rbd,image=bench,block_size=4096,config_file={}",
        cl.conf.display()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hostplane"))
        .args([
            "bench",
            "bdev",
            "--bdev",
            &spec,
            "--rw",
            "randwrite",
            "--bs",
            "4096",
        ])
        .args([
            "--qd",
            "16",
            "--time",
            "4",
            "--threads",
            "--idle-sleep-us",
            "50",
        ])
        .arg("--rbd-bench")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let ratio: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ratio hostplane/rbd-bench IOPS: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .expect("ratio line");
    // Both are bounded by the one-node cluster on a shared machine: report, fail only when far
    // off (a broken data path), not on noise.
    assert!(ratio > 0.5, "ratio {ratio}");
}

/// Needs the vhost-user-blk backend (vhost branch, not merged yet): a QEMU guest (tests/guest)
/// runs `fio --verify=crc32c` on a vhost-user-blk disk whose bdev is rbd, with the OSD stopped
/// for 5 s mid-run; expected: 0 errors. Enable when `vhost_create_blk_controller` lands.
#[test]
#[ignore = "needs the vhost-user-blk backend (vhost branch)"]
fn guest_fio_on_rbd_vhost_blk() {}
