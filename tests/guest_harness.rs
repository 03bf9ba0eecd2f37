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
    fn start(image: &Path, socket: &Path, num_queues: u16, writable: bool) -> StorageDaemon {
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
                 writable={},num-queues={num_queues}",
                socket.display(),
                if writable { "on" } else { "off" }
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

/// The guest images, or why this machine cannot run guests (the caller prints "skipped").
fn guest_images() -> Result<guest::GuestImages, String> {
    let images = guest::images().map_err(|e| e.to_string())?;
    if !guest::have_program("qemu-storage-daemon") {
        return Err("qemu-storage-daemon not found".into());
    }
    Ok(images)
}

/// A fresh dir with a zeroed raw image of `DISK_BYTES`.
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("hp-guest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create image");
    (dir, image)
}

#[test]
fn guest_fio_verify_over_qemu_storage_daemon() {
    let t0 = Instant::now();
    let images = match guest_images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let build_time = t0.elapsed();
    let (dir, image) = scratch("rw");
    let socket = dir.join("vhost.sock");
    let _daemon = StorageDaemon::start(&image, &socket, 2, true);

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

/// A read-only export: the guest sees the disk read-only, reads work, writes fail, and the host
/// image is untouched. (The guest kernel refuses the writes itself; a backend's own read-only
/// check needs a raw vhost-user frontend to be tested.)
#[test]
fn guest_readonly_disk_over_qemu_storage_daemon() {
    let t0 = Instant::now();
    let images = match guest_images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let (dir, image) = scratch("ro");
    let socket = dir.join("vhost.sock");
    let _daemon = StorageDaemon::start(&image, &socket, 1, false);

    let script = [
        job::disk_info("vda"),
        job::run(
            "ro.read",
            "dd if=/dev/vda of=/dev/null bs=64k count=16 iflag=direct",
        ),
        job::write_file_at("ro.write", "/pattern.bin", "vda", 0),
        job::fio(
            "fio.ro",
            "--name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=1M --ioengine=libaio \
             --direct=1",
        ),
    ]
    .concat();
    let out = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![socket.clone()],
            job: script,
            files: vec![("/pattern.bin".into(), pattern(4096))],
            timeout: Duration::from_secs(90),
            ..Default::default()
        },
    )
    .expect("launch guest")
    .wait()
    .unwrap_or_else(|e| panic!("guest run: {e}"));

    let disk = out.disk("vda").expect("disk info");
    println!("guest disk vda: {disk}");
    assert!(disk.read_only, "VIRTIO_BLK_F_RO must show as ro");
    assert_eq!(
        out.int("ro.read.rc").ok(),
        Some(0),
        "reads work: {:?}",
        out.blobs
    );
    assert_ne!(out.int("ro.write.rc").ok(), Some(0), "dd write must fail");
    println!("dd write: {}", out.blobs["ro.write.stderr"].trim());
    let fio = out.fio("fio.ro").expect("fio report");
    assert!(fio.errors() > 0, "fio writes must fail on a read-only disk");
    assert_eq!(fio.write_bytes(), 0);
    let data = std::fs::read(&image).expect("read image");
    assert!(data.iter().all(|&b| b == 0), "read-only image was modified");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "guest boot {:.1} s, test total {:.1} s",
        out.boot_time.unwrap_or_default().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The pattern for "act on the host while the guest job runs": fio runs in the background,
/// the host restarts the backend under it, then collects the result. Ignored by default:
/// qemu-storage-daemon 7.2 has no inflight tracking, and QEMU's replay after a reconnect
/// occasionally breaks the virtqueue (see PLATFORM-NOTES), so this is an example and a baseline
/// (`cargo test --test guest_harness -- --ignored --nocapture`), not a gate.
#[test]
#[ignore]
fn guest_fio_across_qemu_storage_daemon_restart() {
    let images = match guest_images() {
        Ok(i) => i,
        Err(e) => return println!("skipped: {e}"),
    };
    let (dir, image) = scratch("restart");
    let socket = dir.join("vhost.sock");
    let mut daemon = StorageDaemon::start(&image, &socket, 1, true);
    let script = [
        job::fio_background(
            "fio.long",
            "--name=l --filename=/dev/vda --rw=randwrite --bs=4k --size=16M --ioengine=libaio \
             --iodepth=8 --direct=1 --verify=crc32c --verify_backlog=512 --time_based \
             --runtime=12",
        ),
        job::mark("fio.started"),
        job::wait_background(),
    ]
    .concat();
    let mut g = Guest::launch(
        &images,
        GuestConfig {
            vhost_sockets: vec![socket.clone()],
            job: script,
            timeout: Duration::from_secs(90),
            ..Default::default()
        },
    )
    .expect("launch guest");
    g.wait_for_result("fio.started", Duration::from_secs(60))
        .expect("fio started");
    std::thread::sleep(Duration::from_secs(3));
    drop(daemon);
    std::thread::sleep(Duration::from_millis(500));
    daemon = StorageDaemon::start(&image, &socket, 1, true);
    let out = g.wait().unwrap_or_else(|e| panic!("guest run: {e}"));
    drop(daemon);
    let fio = out.fio("fio.long").expect("fio report");
    println!(
        "fio across a restart: {} errors, max latency {:?} (the guest-visible stall)",
        fio.errors(),
        fio.max_lat()
    );
    fio.assert_clean();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The result channel's format, without QEMU.
#[test]
fn report_parsing() {
    let text = "HP-RESULT a=1\r\nnoise\nHP-READY\nHP-BLOB-BEGIN b\n{\n x\n}\n\nHP-BLOB-END b\n\
                HP-RESULT a=two words=and=equals\nHP-DONE\n";
    let r = guest::Report::parse(text);
    assert!(r.ready && r.done);
    assert_eq!(r.get("a"), Some("two words=and=equals"), "last value wins");
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.blobs["b"], "{\n x\n}\n");
    assert!(r.get("missing").is_none());
}
