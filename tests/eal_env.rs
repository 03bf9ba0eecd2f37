//! The environment layer on a real EAL (no hugepages): init once, lcore launch, ring messages
//! between two lcores, mempool exhaustion, mbuf ownership through rx/tx on net_null and
//! net_ring (a driver that refuses frames when its ring is full).
//!
//! One #[test]: EAL can be initialised once per process.

mod common;

use hostplane::env::{
    self, lcore, ring, Eal, EnvError, EthPort, Mbuf, MbufBurst, Mempool, PortConfig, BURST_SIZE,
};
use std::time::{Duration, Instant};

fn init() -> Eal {
    let mut args = vec!["-l".to_string(), "0-1".to_string()];
    args.extend(common::eal_test_args("env"));
    args.extend(["--vdev", "net_null0", "--vdev", "net_ring0"].map(String::from));
    Eal::init(&args).expect("EAL init")
}

#[test]
fn environment_layer_on_real_eal() {
    let eal = init();
    assert!(
        matches!(
            Eal::init(&["-l", "0"]),
            Err(EnvError::EalAlreadyInitialised)
        ),
        "second EAL init must be refused"
    );
    assert_eq!(eal.lcore_count(), 2);
    assert_eq!(eal.main_lcore(), 0);
    assert_eq!(eal.worker_lcores(), vec![1]);
    assert!(
        env::dpdk_version().starts_with("DPDK 22.11"),
        "{}",
        env::dpdk_version()
    );
    assert!(env::tsc_hz() > 0);

    ring_messages_between_lcores();
    launch_errors();
    mempool_exhaustion();
    null_port_rx_tx();
    ring_port_returns_unsent_mbufs();
}

/// Main sends numbered messages to lcore 1 over an SP/SC ring; lcore 1 returns each one doubled
/// on a second ring. Every message arrives once, in order.
fn ring_messages_between_lcores() {
    const N: u64 = 200_000;
    let (to_worker, worker_in) = ring::spsc::<u64>("test_to_worker", 1024).expect("ring");
    let (worker_out, from_worker) = ring::spsc::<u64>("test_from_worker", 1024).expect("ring");
    let h = lcore::launch(1, move || {
        assert_eq!(lcore::current(), 1);
        let mut expect = 0;
        while expect < N {
            if let Some(v) = worker_in.recv() {
                if v != expect {
                    return -1;
                }
                let mut msg = v * 2;
                loop {
                    match worker_out.send(msg) {
                        Ok(()) => break,
                        Err(back) => msg = back,
                    }
                }
                expect += 1;
            }
        }
        0
    })
    .expect("launch on lcore 1");
    let mut next_send = 0u64;
    let mut next_recv = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next_recv < N {
        assert!(
            Instant::now() < deadline,
            "ring test stalled at {next_recv}"
        );
        if next_send < N && to_worker.send(next_send).is_ok() {
            next_send += 1;
        }
        if let Some(v) = from_worker.recv() {
            assert_eq!(v, next_recv * 2, "messages out of order");
            next_recv += 1;
        }
    }
    assert_eq!(h.join(), Ok(0));
    assert!(from_worker.is_empty());
    // Undelivered messages are freed with the ring (no leak, no double free): leave some queued.
    let (p, c) = ring::mpmc::<Vec<u8>>("test_leftover", 64).expect("ring");
    for i in 0..10 {
        p.send(vec![i; 100]).expect("room");
    }
    assert_eq!(c.len(), 10);
    assert!(
        p.try_clone().is_some() && c.try_clone().is_some(),
        "mp/mc handles clone"
    );
    drop((p, c));
    let (p, _c) = ring::spsc::<u8>("test_sp", 4).expect("ring");
    assert!(
        p.try_clone().is_none(),
        "a single-producer handle must not clone"
    );
    // Capacity is exact, and a full ring gives the message back.
    for i in 0..4 {
        p.send(i).expect("room");
    }
    assert_eq!(p.send(9), Err(9));
    // Duplicate names are DPDK errors, reported, not panics.
    assert!(matches!(
        ring::spsc::<u8>("test_sp", 4),
        Err(EnvError::Create { .. })
    ));
}

fn launch_errors() {
    // The main lcore is not a worker; lcore 5 is not in this EAL.
    assert!(matches!(
        lcore::launch(0, || 0),
        Err(EnvError::Launch { .. })
    ));
    assert!(matches!(
        lcore::launch(5, || 0),
        Err(EnvError::Launch { .. })
    ));
    // A panicking closure is reported by join, not unwound into C. (Quiet hook: the panic is
    // expected, its backtrace would only confuse a reader of the test log.)
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let h = lcore::launch(1, || panic!("boom")).expect("launch");
    let joined = h.join();
    std::panic::set_hook(hook);
    assert!(joined.is_err());
    // The lcore is usable again afterwards.
    assert_eq!(lcore::launch(1, || 7).expect("launch").join(), Ok(7));
}

fn mempool_exhaustion() {
    let pool = Mempool::pktmbuf("test_small", 63, 0, 2048 + 128, -1).expect("pool");
    assert_eq!(pool.avail(), 63);
    let mut held: Vec<Mbuf> = Vec::new();
    loop {
        match pool.alloc() {
            Ok(m) => held.push(m),
            Err(EnvError::PoolExhausted) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
        assert!(held.len() <= 63, "allocated more mbufs than the pool has");
    }
    assert_eq!(held.len(), 63);
    assert_eq!(pool.avail(), 0);
    // Data access and append on an owned mbuf.
    let m = &mut held[0];
    assert_eq!(m.data_len(), 0);
    m.append(60).expect("tailroom").copy_from_slice(&[0xab; 60]);
    assert_eq!(m.data(), &[0xab; 60][..]);
    assert!(
        m.append(100_000).is_none(),
        "append beyond tailroom must fail, not overflow"
    );
    assert!(m.trim(10));
    assert_eq!(m.pkt_len(), 50);
    // Dropping returns every mbuf.
    held.clear();
    assert_eq!(pool.avail(), 63);
    // A burst owns its mbufs and frees them on drop.
    let mut b = MbufBurst::new();
    for _ in 0..BURST_SIZE {
        b.push(pool.alloc().expect("mbuf")).ok().expect("room");
    }
    let extra = pool.alloc().expect("mbuf");
    assert!(b.push(extra).is_err(), "a full burst gives the mbuf back");
    assert_eq!(pool.avail(), 63 - BURST_SIZE as u32);
    drop(b);
    assert_eq!(pool.avail(), 63);
    // Bad names are reported.
    assert!(matches!(
        Mempool::pktmbuf("test_small", 63, 0, 2176, -1),
        Err(EnvError::Create { .. })
    ));
}

fn null_port_rx_tx() {
    let pool = Mempool::pktmbuf("test_null", 4095, 64, 2048 + 128, -1).expect("pool");
    let port = EthPort::by_name("net_null0").expect("net_null0");
    assert!(EthPort::by_name("net_nope").is_err());
    assert_eq!(port.driver(), "net_null");
    let (mut rxq, mut txq) = {
        let (mut rx, mut tx) = port
            .configure(
                &PortConfig {
                    rx_queues: 1,
                    tx_queues: 1,
                    ..Default::default()
                },
                pool,
            )
            .expect("configure");
        (rx.remove(0), tx.remove(0))
    };
    port.start().expect("start");
    assert!(port.link().up);
    let mut burst = MbufBurst::new();
    let mut received = 0;
    let mut sent = 0;
    for _ in 0..100 {
        received += rxq.rx_burst(&mut burst);
        assert!(burst
            .as_slice()
            .iter()
            .all(|m| m.data_len() == 64 && m.segments() == 1));
        sent += txq.tx_burst(&mut burst);
        assert!(burst.is_empty(), "net_null accepts everything");
    }
    assert_eq!(received, 100 * BURST_SIZE);
    assert_eq!(sent, received);
    let st = port.stats().expect("stats");
    assert_eq!(st.ipackets, received as u64);
    assert_eq!(st.opackets, sent as u64);
    port.stop().expect("stop");
    // Every mbuf went back to the pool (the driver freed what it transmitted).
    assert!(
        pool.avail() >= 4095 - 64,
        "mbufs leaked: {} free",
        pool.avail()
    );
}

fn ring_port_returns_unsent_mbufs() {
    let pool = Mempool::pktmbuf("test_ringport", 4095, 0, 2048 + 128, -1).expect("pool");
    let port = EthPort::by_name("net_ring0").expect("net_ring0");
    let (mut rx, mut tx) = port
        .configure(
            &PortConfig {
                rx_queues: 1,
                tx_queues: 1,
                ..Default::default()
            },
            pool,
        )
        .expect("configure");
    let (mut rxq, mut txq) = (rx.remove(0), tx.remove(0));
    port.start().expect("start");
    let before = pool.avail();
    // Transmit into the port's ring until it refuses: the refused mbufs stay with us.
    let mut accepted = 0;
    let mut refused_burst = None;
    for _ in 0..200 {
        let mut b = MbufBurst::new();
        for i in 0..BURST_SIZE {
            let mut m = pool.alloc().expect("mbuf");
            m.append(64).expect("room").fill(i as u8);
            b.push(m).ok().expect("room");
        }
        let n = txq.tx_burst(&mut b);
        accepted += n;
        if n < BURST_SIZE {
            assert_eq!(
                b.len(),
                BURST_SIZE - n,
                "unsent mbufs must stay in the burst"
            );
            refused_burst = Some(b);
            break;
        }
    }
    let mut refused = refused_burst.expect("net_ring never filled up");
    // The caller owns the refused mbufs: their data is intact, and dropping frees them once.
    assert!(refused.as_slice().iter().all(|m| m.data_len() == 64));
    let refused_n = refused.drop_all();
    assert_eq!(
        pool.avail() as usize,
        before as usize - accepted,
        "refused {refused_n} mbufs not freed exactly once"
    );
    // What the driver accepted comes back on rx (loopback ring) with its content.
    let mut got = 0;
    let mut b = MbufBurst::new();
    loop {
        let n = rxq.rx_burst(&mut b);
        if n == 0 {
            break;
        }
        got += n;
        for (i, m) in b.as_slice().iter().enumerate() {
            assert_eq!(m.data()[0], i as u8);
        }
        b.drop_all();
    }
    assert_eq!(got, accepted);
    assert_eq!(pool.avail(), before);
    port.stop().expect("stop");
}
