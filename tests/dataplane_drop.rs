//! A running `Dataplane` dropped without `stop()` (an early return or a panic in its owner) stops
//! its lcores and returns, instead of waiting forever for lcores that poll until told to stop.
//!
//! EAL starts once per process: this file holds exactly one `#[test]`.

mod common;

use hostplane::cli::EalArgs;
use hostplane::config::Config;
use hostplane::runtime::Dataplane;
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn dropping_a_running_dataplane_returns() {
    let (done, finished) = mpsc::channel();
    // Dataplane is not Send (it owns EAL): start and drop it on one thread, watch from another.
    std::thread::spawn(move || {
        let cfg = Config::parse(
            "[[port]]\nname = \"up\"\ndevice = \"net_null0\"\nargs = \"\"\nrole = \"uplink\"\n\
             [[port]]\nname = \"vm0\"\ndevice = \"net_null1\"\nargs = \"\"\nrole = \"vm\"\n",
            "drop test",
        )
        .expect("config");
        let cli = EalArgs {
            lcore_list: Some("0-1".into()),
            eal: common::eal_test_args("drop"),
            ..Default::default()
        };
        let dp = Dataplane::start(&cfg, &cli).expect("start");
        std::thread::sleep(Duration::from_millis(200));
        assert!(dp.totals().polls > 0, "the net lcore runs");
        drop(dp);
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(20))
        .expect("drop(Dataplane) did not return within 20 s: its lcores were never told to stop");
}
