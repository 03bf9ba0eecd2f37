//! Validates the QEMU guest harness against QEMU's own vhost-user-blk backend
//! (`qemu-storage-daemon --export type=vhost-user-blk`): the guest sees the disk, fio verify runs
//! clean over two queues, and data the guest writes lands byte-exact in the host image.
//! hostplane's own vhost-user-blk tests use the same harness pointed at hostplane's socket.

#[path = "guest/mod.rs"]
mod guest;

use guest::{job, Guest, GuestConfig};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 64 << 20;
const PATTERN_OFFSET: u64 = 48 << 20; // beyond both fio regions (0..32 MiB)
const PATTERN_BYTES: usize = 64 << 10;

/// qemu-storage-daemon exporting one raw file over vhost-user-blk; killed on drop.
struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    fn start(image: &Path, socket: &Path, num_queues: u16) -> StorageDaemon {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=d0",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={num_queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut d = StorageDaemon {
            child,
            socket: socket.to_path_buf(),
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !d.socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("qemu-storage-daemon exited: {st}");
            }
            assert!(
                Instant::now() < until,
                "qemu-storage-daemon socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Deterministic, non-repeating bytes (xorshift), so a misplaced block cannot match.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn guest_fio_verify_over_qemu_storage_daemon() {
    let t0 = Instant::now();
    let images = match guest::images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    if !guest::have_program("qemu-storage-daemon") {
        return println!("skipped: qemu-storage-daemon not found");
    }
    let build_time = t0.elapsed();

    let dir = std::env::temp_dir().join(format!("hp-guest-harness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create image");
    let socket = dir.join("vhost.sock");
    let _daemon = StorageDaemon::start(&image, &socket, 2);

    let common = "--filename=/dev/vda --ioengine=libaio --iodepth=8 --direct=1 \
                  --verify=crc32c --do_verify=1 --size=16M";
    let script = [
        job::disk_info("vda"),
        job::fio(
            "fio.randwrite",
            &format!("--name=v --rw=randwrite --bs=4k {common}"),
        ),
        job::fio(
            "fio.mixed",
            &format!(
                "--name=m --rw=randrw --rwmixread=50 --bssplit=4k/50:16k/30:64k/20 \
                 --offset=16M {common}"
            ),
        ),
        job::write_file_at("dd.pattern", "/pattern.bin", "vda", PATTERN_OFFSET),
        // The guest's own read-back, through the device (O_DIRECT, no page cache).
        job::result(
            "pattern.readback",
            &format!(
                "\"$(dd if=/dev/vda bs=4096 skip={} count={} iflag=direct 2>/dev/null | md5sum)\"",
                PATTERN_OFFSET / 4096,
                PATTERN_BYTES / 4096
            ),
        ),
        job::result("pattern.file", "\"$(md5sum </pattern.bin)\""),
    ]
    .concat();
    let want = pattern(PATTERN_BYTES);

    let mut g = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![socket.clone()],
            num_queues: 2,
            smp: 2,
            mem_mb: 512,
            job: script,
            files: vec![("/pattern.bin".into(), want.clone())],
            timeout: Duration::from_secs(150),
            ..Default::default()
        },
    )
    .expect("launch guest");
    let boot = g.wait_ready(Duration::from_secs(60)).expect("guest boot");
    let out = g.wait().unwrap_or_else(|e| panic!("guest run: {e}"));

    let disk = out.disk("vda").expect("disk info");
    println!("guest disk vda: {disk}");
    assert_eq!(disk.sectors * 512, DISK_BYTES, "disk size");
    assert_eq!(
        disk.serial, "vhost_user_blk",
        "qemu-storage-daemon's GET_ID string"
    );
    assert!(!disk.read_only);
    assert_eq!(disk.queues, 2, "two vCPUs, two virtqueues");

    for name in ["fio.randwrite", "fio.mixed"] {
        let fio = out
            .fio(name)
            .unwrap_or_else(|e| panic!("{e}\n{}", out.console));
        fio.assert_clean();
        println!(
            "{name}: 0 errors, wrote {} KiB, read {} KiB",
            fio.write_bytes() >> 10,
            fio.read_bytes() >> 10
        );
        assert!(fio.write_bytes() > 0, "{name} wrote nothing");
    }
    assert_eq!(
        out.int("dd.pattern.rc").expect("dd rc"),
        0,
        "{:?}",
        out.blobs
    );
    assert_eq!(
        out.get("pattern.readback"),
        out.get("pattern.file"),
        "guest read-back"
    );
    assert_eq!(out.int("job.rc").ok(), Some(0));

    // The guest is gone (fsync'd, powered off): the host image must hold the pattern exactly.
    let mut got = vec![0u8; PATTERN_BYTES];
    std::fs::File::open(&image)
        .and_then(|f| f.read_exact_at(&mut got, PATTERN_OFFSET))
        .expect("read image");
    assert!(
        got == want,
        "host image differs from what the guest wrote at {PATTERN_OFFSET}"
    );

    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "guest boot {:.1} s (guest kernel uptime at ready {} s), guest run {:.1} s, image build {:.1} s, test total {:.1} s",
        boot.as_secs_f64(),
        out.get("init.uptime").unwrap_or("?"),
        out.run_time.as_secs_f64(),
        build_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
