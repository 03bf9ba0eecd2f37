//! `hostplane convert`: the RPC client side with a progress bar, and the offline mode (one
//! plain-thread reactor in this process, same conversion code), with an optional pattern writer
//! used by the crash test.

use super::{Conversion, ConvertParams, ConvertStatus};
use crate::cli::{ConvertCommand, ConvertOfflineArgs, ConvertSpecArgs};
use crate::control::client::call;
use crate::storage::client::{BdevClient, Op};
use crate::storage::reactor::{ReactorOptions, ReactorSet};
use crate::storage::IoStatus;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn params(s: &ConvertSpecArgs, reactor: u32) -> Result<ConvertParams, Error> {
    Ok(ConvertParams {
        name: s.name.clone(),
        source: s.source.clone(),
        source_format: s.source_format.parse()?,
        target: s.target.clone(),
        grain_size: s.grain_size,
        rate_mib: s.rate_mib,
        block_size: s.block_size,
        map: None,
        direct: !s.no_direct,
        reactor,
    })
}

/// One progress line: `[#####.....]  42.0%  1234/4096 grains  210.3 MiB/s  ETA 3.2s`.
pub fn progress_line(name: &str, st: &ConvertStatus) -> String {
    const W: usize = 30;
    let filled = ((st.percent / 100.0) * W as f64).round() as usize;
    let eta = match st.eta_s {
        Some(e) => format!("{e:.1}s"),
        None => "-".into(),
    };
    format!(
        "{name} [{}{}] {:5.1}% {}/{} grains {:.1} MiB/s ETA {eta} {}",
        "#".repeat(filled.min(W)),
        ".".repeat(W - filled.min(W)),
        st.percent,
        st.grains_done,
        st.grains_total,
        st.mib_per_s,
        st.state
    )
}

fn rpc(socket: &Path, method: &str, p: Value) -> Result<Value, Error> {
    Ok(call(socket, method, p, Duration::from_secs(60))?)
}

fn watch(socket: &Path, name: &str) -> Result<(), Error> {
    let mut err = std::io::stderr();
    loop {
        let v = rpc(socket, "bdev_convert_status", json!({ "name": name }))?;
        let c = v["conversions"]
            .get(0)
            .cloned()
            .ok_or("conversion disappeared")?;
        let st: ConvertStatus = serde_json::from_value(c.clone())?;
        let _ = write!(err, "\r{}", progress_line(name, &st));
        let _ = err.flush();
        if st.state == "done" {
            let _ = writeln!(err);
            println!("{}", serde_json::to_string_pretty(&c)?);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `hostplane convert ...`.
pub fn run(cmd: ConvertCommand) -> Result<(), Error> {
    match cmd {
        ConvertCommand::Start(a) => {
            let p = params(&a.spec, a.reactor)?;
            let v = rpc(&a.socket, "bdev_convert_start", serde_json::to_value(&p)?)?;
            if a.no_wait {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            watch(&a.socket, &p.name)
        }
        ConvertCommand::Status(a) => match (&a.name, a.watch) {
            (Some(n), true) => watch(&a.socket, n),
            _ => {
                let v = rpc(&a.socket, "bdev_convert_status", json!({ "name": a.name }))?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
        },
        ConvertCommand::Pause(a) => pause(&a, "bdev_convert_pause"),
        ConvertCommand::Resume(a) => pause(&a, "bdev_convert_resume"),
        ConvertCommand::Offline(a) => offline(&a),
    }
}

fn pause(a: &crate::cli::ConvertNameArgs, method: &str) -> Result<(), Error> {
    let name = a.name.as_deref().ok_or("--name is required")?;
    let v = rpc(&a.socket, method, json!({ "name": name }))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// The pattern written by write number `seq`: every 8-byte word is `seq << 32 | word index`,
/// so a region tells which write put it there.
pub fn pattern(seq: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for w in 0..(len / 8) as u64 {
        v.extend_from_slice(&((seq << 32) | w | 0x8000_0000).to_le_bytes());
    }
    v.resize(len, 0);
    v
}

/// Where write `seq` goes: each 64 KiB slot of the disk at most once (a permutation), either the
/// whole slot (every 4th write: the whole-grain path with 64 KiB grains) or one 4 KiB block in it
/// (copy-before-write).
pub fn writer_target(seq: u64, disk: u64) -> (u64, u64) {
    let slots = (disk / 65536).max(1);
    // An odd multiplier is a permutation modulo a power of two; other sizes may repeat a slot,
    // which the checker tolerates (later writes win, both are logged).
    let slot = seq.wrapping_mul(0x9E37_79B1) % slots;
    if seq.is_multiple_of(4) {
        (slot * 65536, 65536.min(disk))
    } else {
        let blk = (seq.wrapping_mul(7919) >> 3) % 16;
        (slot * 65536 + blk * 4096, 4096)
    }
}

fn last_seq(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("I ")?.split(' ').next()?.parse::<u64>().ok())
        .max()
        .map_or(0, |s| s + 1)
}

fn offline(a: &ConvertOfflineArgs) -> Result<(), Error> {
    let p = params(&a.spec, 0)?;
    let name = p.name.clone();
    let c = Conversion::prepare(p)?;
    let reactors = ReactorSet::spawn_threads(1, ReactorOptions::polite())?;
    let h = reactors.handle(0).ok_or("no reactor")?;
    c.attach(&h)?;
    if c.resumed {
        log::info!(
            "resuming: {}/{} grains already converted",
            c.stats.resumed_grains,
            c.stats.total_grains
        );
    }
    let client = BdevClient::open(&h, &c.bdev)?;
    let disk = c.bdev.info().size();
    let mut log = match &a.writer_log {
        Some(p) => Some((
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
            last_seq(p),
        )),
        None => None,
    };
    let mut inflight: VecDeque<(u64, crossbeam_channel::Receiver<_>)> = VecDeque::new();
    let mut err = std::io::stderr();
    let mut last_print = std::time::Instant::now();
    loop {
        if let Some((f, seq)) = log.as_mut() {
            // Keep the pattern writer's queue full while the conversion runs.
            while inflight.len() < a.writer_qd && *seq < a.writer_ops && !c.stats.is_done() {
                let (off, len) = writer_target(*seq, disk);
                writeln!(f, "I {seq} {off} {len}")?;
                let rx = client.submit(Op::Write {
                    offset: off,
                    data: pattern(*seq, len as usize),
                });
                inflight.push_back((*seq, rx));
                *seq += 1;
            }
            while let Some((s, rx)) = inflight.front() {
                match rx.try_recv() {
                    Ok((IoStatus::Success, _)) => writeln!(f, "A {s}")?,
                    Ok((st, _)) => return Err(format!("write {s} failed: {st:?}").into()),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(_) => return Err("writer: no reply".into()),
                }
                inflight.pop_front();
            }
        }
        let done = c.stats.is_done() && inflight.is_empty();
        if !a.quiet && (last_print.elapsed() > Duration::from_millis(200) || done) {
            let _ = write!(err, "\r{}", progress_line(&name, &c.stats.status()));
            let _ = err.flush();
            last_print = std::time::Instant::now();
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(if log.is_some() { 1 } else { 20 }));
    }
    if !a.quiet {
        let _ = writeln!(err);
    }
    println!("{}", serde_json::to_string(&c.stats.status())?);
    drop(client);
    drop(reactors);
    Ok(())
}
