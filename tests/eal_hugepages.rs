//! EAL on real hugepages, when the machine has some free (CI reserves them with hugepage-setup
//! before the tests; a developer machine without them reports the test as skipped).

mod common;

use hostplane::env::{Eal, EthPort, MbufBurst, Mempool, PortConfig};

#[test]
fn eal_with_hugepages() {
    let free = hostplane::runtime::hugepages_free();
    if free < 64 {
        println!(
            "skipped: {free} free hugepages (reserve some: hugepage-setup config --pages 256)"
        );
        return;
    }
    let args: Vec<String> = [
        "-l",
        "0",
        "--no-pci",
        "--in-memory",
        "-m",
        "64",
        "--file-prefix",
        &format!("hp-test-huge-{}", std::process::id()),
        "--vdev",
        "net_null0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _eal = Eal::init(&args).expect("EAL init on hugepages");
    let pool =
        Mempool::pktmbuf("huge_pool", 8191, 256, 2048 + 128, -1).expect("pool in hugepage memory");
    let port = EthPort::by_name("net_null0").expect("port");
    let (mut rx, mut tx) = port
        .configure(&PortConfig::default(), pool)
        .expect("configure");
    port.start().expect("start");
    let mut b = MbufBurst::new();
    let mut n = 0;
    for _ in 0..1000 {
        n += rx[0].rx_burst(&mut b);
        tx[0].tx_burst(&mut b);
    }
    assert_eq!(n, 32_000);
    assert_eq!(port.stats().expect("stats").opackets, 32_000);
    port.stop().expect("stop");
}
