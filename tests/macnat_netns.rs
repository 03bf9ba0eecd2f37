//! End to end through network namespaces: a "VM" namespace and a "network" namespace joined only
//! through hostplane, which runs in this process with `net_af_packet` ports on the host-side veth
//! ends. The network must see the VM only at its global MAC (ARP, ND, ICMP, UDP), replies must
//! reach the VM, and deleting the VM's table entry must stop translation within 100 ms.
//!
//! Needs root, `ip` (iproute2), `ping` (iputils-ping) and `tcpdump`; prints `skipped: ...` and
//! passes without them. Only the namespaces' own addresses (10.77.0.0/24, fd77::/64) carry
//! traffic. Namespaces and veths are removed on every path (a Drop guard); on failure the
//! network-side capture stays in the test's temp dir for inspection.
//!
//! EAL starts once per process: this file holds exactly one `#[test]`.

mod common;

use hostplane::cli::EalArgs;
use hostplane::config::Config;
use hostplane::net::packet::{IpKey, MacAddr};
use hostplane::net::pcap;
use hostplane::runtime::Dataplane;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const VM_LOCAL: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xaa, 0x00, 0x02]);
const VM_GLOBAL: MacAddr = MacAddr([0x02, 0x00, 0x00, 0xaa, 0x00, 0x01]);
const NET_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0xbb, 0x00, 0x01]);
const VM_IP4: [u8; 4] = [10, 77, 0, 2];

/// Runs a command; panics with its output when it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when `cmd arg` can be started and exits 0.
fn works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !works("ip", &["netns", "list"]) {
        return Some("`ip netns` unavailable (apt-get install iproute2)".into());
    }
    if !works("ping", &["-V"]) {
        return Some("ping not installed (apt-get install iputils-ping)".into());
    }
    if !works("tcpdump", &["--version"]) {
        return Some("tcpdump not installed (apt-get install tcpdump)".into());
    }
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Some("no IPv6 in this kernel".into());
    }
    None
}

/// Two namespaces and two veth pairs; removed on drop, whatever state setup reached.
struct Topology {
    vm_ns: String,
    net_ns: String,
    /// Host-side ends: VM side (A) and network side (B).
    host_a: String,
    host_b: String,
}

impl Topology {
    fn create() -> Topology {
        let pid = std::process::id();
        let t = Topology {
            vm_ns: format!("hpvm-{pid}"),
            net_ns: format!("hpnet-{pid}"),
            host_a: format!("hpa{pid}"),
            host_b: format!("hpb{pid}"),
        };
        for ns in [&t.vm_ns, &t.net_ns] {
            run(&["ip", "netns", "add", ns]);
            // No duplicate address detection: addresses are usable at once (no flaky waits).
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
        }
        run(&[
            "ip", "link", "add", &t.host_a, "type", "veth", "peer", "name", "veth0", "netns",
            &t.vm_ns,
        ]);
        run(&[
            "ip", "link", "add", &t.host_b, "type", "veth", "peer", "name", "veth0", "netns",
            &t.net_ns,
        ]);
        for host in [&t.host_a, &t.host_b] {
            // The host-side ends carry no addresses and no IPv6 (no link-local, RS or MLD of the
            // host's own): only hostplane sends on them.
            run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{host}.disable_ipv6=1"),
            ]);
            run(&["ip", "link", "set", host, "up"]);
        }
        for (ns, mac, ip4, ip6) in [
            (&t.vm_ns, VM_LOCAL, "10.77.0.2/24", "fd77::2/64"),
            (&t.net_ns, NET_MAC, "10.77.0.1/24", "fd77::1/64"),
        ] {
            let ip = |args: &[&str]| run(&[&["ip", "-n", ns.as_str()], args].concat());
            ip(&["link", "set", "veth0", "address", &mac.to_string()]);
            ip(&["addr", "add", ip4, "dev", "veth0"]);
            ip(&["addr", "add", ip6, "dev", "veth0", "nodad"]);
            ip(&["link", "set", "veth0", "up"]);
            ip(&["link", "set", "lo", "up"]);
            // net_af_packet (DPDK 22.11) hands on a CHECKSUM_PARTIAL packet as it is: with the
            // veth's tx checksum offload on, UDP/TCP would reach the other namespace with an
            // unfinished checksum and be dropped there. A NIC or virtio path completes it.
            if works("ethtool", &["--version"]) {
                run(&[
                    "ip", "netns", "exec", ns, "ethtool", "-K", "veth0", "tx", "off",
                ]);
            }
        }
        t
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c
    }

    /// The link-layer address of `ip` in `ns`'s neighbour table.
    fn neighbour(&self, ns: &str, ip: &str) -> Option<String> {
        let text = run(&["ip", "-n", ns, "neigh", "show", ip, "dev", "veth0"]);
        let mut words = text.split_whitespace();
        words.position(|w| w == "lladdr")?;
        words.next().map(str::to_string)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for link in [&self.host_a, &self.host_b] {
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status();
        }
        for ns in [&self.vm_ns, &self.net_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A child process that is interrupted (SIGINT, so tcpdump flushes) and reaped on drop.
struct Bg(Child);

impl Bg {
    /// SIGINT, then wait up to 5 s (SIGKILL after that).
    fn interrupt(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill() only sends a signal; the pid is our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.interrupt();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns` (setns changes only the calling thread).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: `file` is an open namespace file for the whole call; CLONE_NEWNET moves only this
        // thread, which is ours and ends with `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// ping from `ns`; asserts every echo was answered.
fn ping(topo: &Topology, ns: &str, args: &[&str], dst: &str) {
    let out = topo
        .exec(
            ns,
            &[&["ping", "-c", "3", "-i", "0.2", "-w", "10"], args, &[dst]].concat(),
        )
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("3 received"),
        "ping {dst} from {ns} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// UDP from the VM namespace to the network namespace: three datagrams arrive from 10.77.0.2.
fn udp_check(topo: &Topology) {
    let (ready_tx, ready) = mpsc::channel();
    let receiver = in_netns(&topo.net_ns, move || {
        let s = UdpSocket::bind("10.77.0.1:9999").expect("bind in network ns");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 3 {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => got.push((buf[..n].to_vec(), from)),
                Err(_) => break,
            }
        }
        got
    });
    ready
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver ready");
    in_netns(&topo.vm_ns, || {
        let s = UdpSocket::bind("10.77.0.2:0").expect("bind in vm ns");
        for i in 0..3u8 {
            s.send_to(&[b'h', b'p', b'0' + i], "10.77.0.1:9999")
                .expect("send");
        }
    })
    .join()
    .expect("sender");
    let got = receiver.join().expect("receiver");
    assert_eq!(got.len(), 3, "UDP datagrams that arrived: {got:?}");
    for (i, (data, from)) in got.iter().enumerate() {
        assert_eq!(data.as_slice(), &[b'h', b'p', b'0' + i as u8]);
        assert_eq!(from.ip().to_string(), "10.77.0.2");
    }
}

fn ns_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Starts tcpdump on the network namespace's veth, writing `file`; returns once it captures.
fn start_capture(topo: &Topology, file: &Path) -> Bg {
    let mut child = topo
        .exec(
            &topo.net_ns,
            &[
                "tcpdump", "-i", "veth0", "-e", "-nn", "-U", "-Z", "root", "-w",
            ],
        )
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    let stderr = child.stderr.take().expect("tcpdump stderr");
    let bg = Bg(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("tcpdump did not start listening");
    bg
}

#[test]
fn macnat_netns_end_to_end() {
    if let Some(why) = missing_prerequisite() {
        println!("skipped: {why}");
        return;
    }
    let t0 = Instant::now();
    let tmp: PathBuf = common::temp_dir("netns");
    // Declared first so it is dropped last: namespaces outlive the dataplane and the children.
    let topo = Topology::create();
    let toml = format!(
        "[[port]]\nname = \"uplink\"\ndevice = \"net_af_packet1\"\nargs = \"iface={b},qpairs=1\"\nrole = \"uplink\"\n\n\
         [[port]]\nname = \"vm0\"\ndevice = \"net_af_packet0\"\nargs = \"iface={a},qpairs=1\"\nrole = \"vm\"\n\n\
         [[macnat]]\nip = \"10.77.0.2\"\nlocal_mac = \"{VM_LOCAL}\"\nglobal_mac = \"{VM_GLOBAL}\"\nport = \"vm0\"\n\n\
         [[macnat]]\nip = \"fd77::2\"\nlocal_mac = \"{VM_LOCAL}\"\nglobal_mac = \"{VM_GLOBAL}\"\nport = \"vm0\"\n",
        a = topo.host_a,
        b = topo.host_b
    );
    let cfg = Config::parse(&toml, "netns").expect("config");
    let cli = EalArgs {
        lcore_list: Some("0-1".into()),
        eal: common::eal_test_args("netns"),
        ..Default::default()
    };
    let dp = Dataplane::start(&cfg, &cli).expect("start dataplane");
    let cap_file = tmp.join("network-side.pcap");
    let mut capture = start_capture(&topo, &cap_file);
    println!("setup: {:.1}s", t0.elapsed().as_secs_f64());

    // IPv4: ARP and ICMP through MAC-NAT; the network knows the VM only by its global MAC.
    ping(&topo, &topo.vm_ns, &[], "10.77.0.1");
    assert_eq!(
        topo.neighbour(&topo.net_ns, "10.77.0.2").as_deref(),
        Some(VM_GLOBAL.to_string().as_str()),
        "network's ARP entry for the VM"
    );
    assert_eq!(
        topo.neighbour(&topo.vm_ns, "10.77.0.1").as_deref(),
        Some(NET_MAC.to_string().as_str()),
        "VM's ARP entry for the network"
    );
    // IPv6: NS/NA with link-layer address options, then ICMPv6 echo.
    ping(&topo, &topo.vm_ns, &["-6"], "fd77::1");
    assert_eq!(
        topo.neighbour(&topo.net_ns, "fd77::2").as_deref(),
        Some(VM_GLOBAL.to_string().as_str()),
        "network's ND entry for the VM"
    );
    if works("ethtool", &["--version"]) {
        udp_check(&topo);
    } else {
        println!(
            "skipped: UDP check (ethtool missing: needed to turn off veth tx checksum offload)"
        );
    }
    println!("ping, ping6, udp: {:.1}s", t0.elapsed().as_secs_f64());

    // Delete the entry while a ping flood runs: translation must stop within 100 ms.
    let mut flood = Bg(topo
        .exec(
            &topo.vm_ns,
            &["ping", "-q", "-i", "0.01", "-w", "10", "10.77.0.1"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping flood"));
    std::thread::sleep(Duration::from_millis(1000));
    let before = dp.totals();
    let asked = Instant::now();
    dp.table.delete(&[IpKey::V4(VM_IP4)]).expect("delete entry");
    let deleted_at = ns_since_epoch(SystemTime::now());
    let delete_took = asked.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    flood.interrupt();
    std::thread::sleep(Duration::from_millis(50));
    capture.interrupt();
    let totals = dp.stop().expect("stop dataplane");
    println!("totals: {totals:?}");

    let records = pcap::read_records(&cap_file).expect("read capture");
    assert!(!records.is_empty(), "capture is empty");
    for (i, r) in records.iter().enumerate() {
        assert!(
            !r.data.windows(6).any(|w| w == VM_LOCAL.0),
            "network-side frame {i} carries the VM's local MAC: {:02x?}",
            r.data
        );
    }
    // Frames on the network side from the VM's IPv4 address at its global MAC.
    let translated: Vec<u64> = records
        .iter()
        .filter(|r| {
            r.data.len() >= 34
                && r.data[6..12] == VM_GLOBAL.0
                && r.data[12..14] == [0x08, 0x00]
                && r.data[26..30] == VM_IP4
        })
        .map(|r| r.ts_ns)
        .collect();
    let last = *translated
        .iter()
        .max()
        .expect("translated frames on the network side");
    let during_flood = translated
        .iter()
        .filter(|&&t| t + 1_000_000_000 > deleted_at && t <= deleted_at)
        .count();
    let after = translated.iter().filter(|&&t| t > deleted_at).count();
    let lag_ms = (last as f64 - deleted_at as f64) / 1e6;
    println!(
        "delete took {:.2} ms; {during_flood} VM frames in the second before it; {after} after it; last one {lag_ms:+.2} ms from its return",
        delete_took.as_secs_f64() * 1e3
    );
    assert!(
        during_flood >= 10,
        "the flood was not flowing before the delete ({during_flood} frames in 1 s)"
    );
    assert!(lag_ms < 100.0, "a translated frame from the VM reached the network {lag_ms:.1} ms after the delete returned");
    // After the delete the flood's frames are dropped as unknown.
    assert!(
        totals.drop_count("unknown_ip") > before.drop_count("unknown_ip") + 10,
        "flood frames after the delete are dropped as unknown_ip"
    );
    drop(capture);
    drop(flood);
    let _ = std::fs::remove_dir_all(&tmp);
    println!("macnat_netns: {:.1}s", t0.elapsed().as_secs_f64());
}
