//! Storage reactors on real EAL lcores with rte_ring message queues (one #[test]: EAL starts once
//! per process), and `hostplane run` with a storage-only config (spawned binary).

mod common;

use hostplane::env::Eal;
use hostplane::storage::client::{verify_patterns, BdevClient};
use hostplane::storage::reactor::{ReactorOptions, ReactorSet};
use hostplane::storage::BackendRegistry;
use serde_json::json;
use std::process::Command;

#[test]
fn reactors_on_lcores_and_storage_only_run() {
    let mut args = common::eal_test_args("storage");
    args.extend(["-l".into(), "0-1".into()]);
    let eal = Eal::init(&args).expect("EAL init");
    let workers = eal.worker_lcores();
    assert_eq!(workers, vec![1]);

    // 1. A reactor on lcore 1, messages over an rte_ring; IO on malloc and file. Everything that
    // holds a ring is dropped (in this block) before EAL is cleaned up.
    let dir = common::temp_dir("storage-eal");
    {
        let mut set =
            ReactorSet::launch_lcores(&workers, ReactorOptions::default()).expect("launch reactor");
        let h = set.handle(0).unwrap();
        assert_eq!(h.call(|r| r.lcore()).unwrap(), Some(1));
        assert_eq!(h.call(|_| hostplane::env::lcore::current()).unwrap(), 1);
        let reg = BackendRegistry::with_builtin();
        for (t, p) in [
            ("malloc", json!({"size_mib": 8})),
            ("file", json!({"path": dir.join("f.img"), "size_mib": 8})),
        ] {
            let b = reg.create(t, t, &p, false).unwrap();
            let c = BdevClient::open(&h, &b).unwrap();
            let mut model = vec![0u8; 8 << 20];
            verify_patterns(&c, &mut model, 5, 10, 32, 64, true)
                .unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(b.iostat().io_error.total(), 0);
        }
        let s = set.stats();
        assert_eq!(s[0].lcore, Some(1));
        assert!(s[0].busy > 0 && s[0].idle > 0 && s[0].msgs >= 4, "{s:?}");
        assert!(set.stop().is_empty());
    }
    drop(eal);

    // 2. `hostplane run` with storage only: no ports, one reactor, one good and two bad disks.
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
params = {{ size_mib = 16 }}
[[vm.disk]]
name = "data"
system = "file"
params = {{ path = "{file}", size_mib = 4 }}

[[vm]]
name = "vm2"
[[vm.disk]]
name = "root"
system = "ceph"
[[vm.disk]]
name = "remote"
system = "nbd"
params = {{ address = "unix:{dir}/absent.sock" }}
"#,
            eal = common::eal_test_args("storage-run"),
            file = dir.join("vm1-data.img").display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hostplane"))
        .args([
            "run",
            "--duration",
            "1.2",
            "--stats-interval",
            "0.5",
            "--config",
        ])
        .arg(&cfg)
        .env("HOSTPLANE_RPC_SOCKET", common::rpc_socket("storage-run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hostplane run failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("reactor 0 lcore 1"), "{stdout}");
    assert!(
        stdout.contains("disk vm1/root [malloc] reactor 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("disk vm1/data [file] reactor 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("disk vm2/root [ceph]: FAILED: unknown storage system \"ceph\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("disk vm2/remote [nbd]: FAILED: nbd unix:"),
        "{stdout}"
    );
    assert!(stderr.contains("other disks and VMs continue"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
