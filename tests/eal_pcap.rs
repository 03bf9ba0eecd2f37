//! ethdev on a net_pcap pair: frames written into the rx capture come out of the tx capture
//! bit-identical and in order (what every golden test relies on). One #[test] (EAL once).

mod common;

use hostplane::env::{Eal, EthPort, MbufBurst, Mempool, PortConfig};
use hostplane::net::frames;
use hostplane::net::packet::MacAddr;
use hostplane::net::pcap;
use std::time::{Duration, Instant};

#[test]
fn pcap_pair_is_bit_identical() {
    let dir = common::temp_dir("eal-pcap");
    let input = dir.join("in.pcap");
    let output = dir.join("out.pcap");
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    let b = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for i in 0..200u32 {
        let len = 60 + (i as usize * 37) % 1400;
        let mut f = frames::ipv4_udp(a, b, [10, 0, 0, 2], [10, 0, 0, (i % 250) as u8 + 1], len);
        let last = f.len() - 1;
        f[last] = i as u8;
        sent.push(f);
    }
    sent.push(frames::arp(
        MacAddr::BROADCAST,
        b,
        1,
        b,
        [10, 0, 0, 2],
        MacAddr::ZERO,
        [10, 0, 0, 1],
    ));
    pcap::write_frames(&input, &sent).expect("write input");

    let mut args = vec!["-l".to_string(), "0".to_string()];
    args.extend(common::eal_test_args("pcap"));
    args.extend([
        "--vdev".to_string(),
        format!(
            "net_pcap0,rx_pcap={},tx_pcap={}",
            input.display(),
            output.display()
        ),
    ]);
    let _eal = Eal::init(&args).expect("EAL init");
    let pool = Mempool::pktmbuf("pcap_pool", 4095, 64, 2048 + 128, -1).expect("pool");
    let port = EthPort::by_name("net_pcap0").expect("port");
    let (mut rx, mut tx) = port
        .configure(&PortConfig::default(), pool)
        .expect("configure");
    let (mut rxq, mut txq) = (rx.remove(0), tx.remove(0));
    port.start().expect("start");
    let mut burst = MbufBurst::new();
    let mut forwarded = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while forwarded < sent.len() && Instant::now() < deadline {
        if rxq.rx_burst(&mut burst) > 0 {
            forwarded += txq.tx_burst(&mut burst);
            assert!(burst.is_empty(), "net_pcap tx writes everything");
        }
    }
    assert_eq!(forwarded, sent.len());
    assert_eq!(rxq.rx_burst(&mut burst), 0, "the capture replays once");
    let st = port.stats().expect("stats");
    assert_eq!(
        (st.ipackets, st.opackets),
        (sent.len() as u64, sent.len() as u64)
    );
    port.stop().expect("stop flushes the tx capture");
    let got = pcap::read_frames(&output).expect("read output");
    assert_eq!(got.len(), sent.len());
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(g, s, "frame {i} differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
