//! The `hostplane` binary as an operator runs it: the embedded default, net_null vdevs with
//! per-lcore counters, config errors that name the field, signals, version.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn hostplane() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hostplane"));
    c.env("HOSTPLANE_RPC_SOCKET", common::rpc_socket("cli"));
    c
}

fn eal(name: &str) -> Vec<String> {
    common::eal_test_args(name)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The value in the `total:` line after `key`.
fn total(stdout: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("total:"))
        .unwrap_or_else(|| panic!("no total line in:\n{stdout}"));
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it
                .next()
                .and_then(|v| v.parse().ok())
                .expect("number after key");
        }
    }
    panic!("no {key} in {line}");
}

#[test]
fn embedded_default_runs_and_translates() {
    let o = hostplane()
        .args(["run", "--duration", "3", "--"])
        .args(eal("default"))
        .output()
        .expect("run");
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(total(&out, "rx") > 0 && total(&out, "tx") > 0, "{out}");
    assert!(
        total(&out, "egress-nat") > 0 && total(&out, "ingress-nat") > 0,
        "{out}"
    );
    assert_eq!(
        total(&out, "dropped"),
        0,
        "the default traffic is all translatable:\n{out}"
    );
    assert!(
        out.matches("--- t=").count() >= 3,
        "interval stats missing:\n{out}"
    );
}

#[test]
fn net_null_prints_per_lcore_counters() {
    let o = hostplane()
        .args(["run", "-l", "0-1", "--duration", "3", "--"])
        .args(eal("null"))
        .args(["--vdev", "net_null0", "--vdev", "net_null1"])
        .output()
        .expect("run");
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    // One row for worker lcore 1 with a non-zero rx count.
    let row = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("no lcore 1 row:\n{out}"));
    let rx: u64 = row
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rx column");
    assert!(rx > 0, "{row}");
    // net_null frames carry no real headers: they are counted as drops, by reason.
    assert!(out.contains("drops:"), "{out}");
    assert!(
        err.contains("port 0 net_null0") && err.contains("Uplink") && err.contains("Vm"),
        "{err}"
    );
}

fn config_error(name: &str, toml: &str, expect: &[&str]) {
    let dir = common::temp_dir(&format!("cfg-{name}"));
    let path = dir.join("bad.toml");
    std::fs::write(&path, toml).expect("write");
    let o = hostplane()
        .args(["run", "--duration", "1", "--config"])
        .arg(&path)
        .arg("--")
        .args(eal(name))
        .output()
        .expect("run");
    let (out, err) = text(&o);
    assert!(
        !o.status.success(),
        "{name}: a bad config must fail\n{out}\n{err}"
    );
    for e in expect {
        assert!(err.contains(e), "{name}: error does not name {e:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_configs_name_the_field() {
    config_error(
        "lcores",
        "[eal]\nlcores = \"0-x\"\n",
        &["eal.lcores", "0-x"],
    );
    config_error("unknown", "[net]\nbogus_key = 1\n", &["bogus_key"]);
    config_error(
        "netlcore",
        "[eal]\nlcores = \"0-1\"\n[net]\nlcores = \"3\"\n",
        &["net.lcores", "not in the EAL lcore set"],
    );
    config_error(
        "nodev",
        "[[port]]\nname = \"up\"\ndevice = \"net_null7\"\nrole = \"uplink\"\n",
        &["port[0].device", "net_null7"],
    );
    config_error(
        "mac",
        "[[port]]\nname = \"up\"\ndevice = \"net_null0\"\nargs = \"\"\nrole = \"uplink\"\n[[port]]\nname = \"vm\"\ndevice = \"net_null1\"\nrole = \"vm\"\n[[macnat]]\nip = \"10.0.0.2\"\nlocal_mac = \"52:54:00:00:00:zz\"\nglobal_mac = \"02:00:00:00:00:01\"\nport = \"vm\"\n",
        &["macnat[0].local_mac"],
    );
    let o = hostplane()
        .args(["run", "--config", "/nonexistent/hp.toml"])
        .output()
        .expect("run");
    assert!(!o.status.success() && text(&o).1.contains("/nonexistent/hp.toml"));
    let o = hostplane()
        .args(["run", "-l", "0-z"])
        .output()
        .expect("run");
    assert!(
        !o.status.success() && text(&o).1.contains("-l"),
        "{}",
        text(&o).1
    );
}

#[test]
fn sigint_stops_cleanly_with_a_summary() {
    let child = hostplane()
        .args(["run", "-l", "0-1", "--stats-interval", "0", "--"])
        .args(eal("sigint"))
        .args(["--vdev", "net_null0", "--vdev", "net_null1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sending a signal to our own child process by pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let started = Instant::now();
    let o = child.wait_with_output().expect("wait");
    assert!(started.elapsed() < Duration::from_secs(10), "slow shutdown");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("=== summary") && total(&out, "rx") > 0,
        "{out}"
    );
    assert!(err.contains("signal received"), "{err}");
}

#[test]
fn version_names_dpdk() {
    let o = hostplane().arg("version").output().expect("run");
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains("hostplane ") && out.contains("DPDK 22.11"),
        "{out}"
    );
    let o = hostplane().arg("--help").output().expect("run");
    let (out, _) = text(&o);
    assert!(out.contains("run") && out.contains("bench"), "{out}");
}

/// `bench macnat` runs the dataplane's own lcore loop on net_null, with a small (one-pass) and a
/// big (prefetch-pass) table, alternating with the swap: it exits with an error unless every
/// frame of every slice was translated and sent, and prints per table size a swap row and a
/// MAC-NAT row with the median ratio and its spread.
#[test]
fn bench_macnat_translates_every_frame_and_prints_ratios() {
    let o = hostplane()
        .args(["bench", "macnat", "--time", "0.3", "--slice", "64"])
        .args(["--entries", "100,20000", "--"])
        .args(eal("bench-macnat"))
        .output()
        .expect("run");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let table = out
        .split_once("alternate every 64 bursts")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no interleaved table in:\n{out}"));
    for entries in ["100", "20000"] {
        let row = |mode: &str| -> Vec<String> {
            table
                .lines()
                .find(|l| l.starts_with(mode) && l.split_whitespace().nth(2) == Some(entries))
                .unwrap_or_else(|| panic!("no {mode} row for {entries} in:\n{out}"))
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let (swap, nat) = (row("macswap"), row("macnat"));
        let num = |r: &[String], i: usize| -> f64 { r[i].parse().expect("a number") };
        // Mpps and cycles/frame agree with each other, and the ratio lies between the
        // 10th and 90th percentiles printed beside it.
        for r in [&swap, &nat] {
            assert!(num(r, 3) > 0.0 && num(r, 4) > 0.0, "{r:?}");
        }
        let ratio = num(&nat, 5);
        let (p10, p90) = nat[6].split_once('-').expect("p10-p90");
        let (p10, p90): (f64, f64) = (p10.parse().unwrap(), p90.parse().unwrap());
        assert!(p10 <= ratio && ratio <= p90 && p10 > 0.0, "{nat:?}");
        assert!(num(&nat, 7) >= 1.0, "no pairs: {nat:?}");
    }
}
