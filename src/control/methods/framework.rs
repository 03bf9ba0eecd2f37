//! SPDK framework methods: `spdk_get_version` and `framework_get_reactors`, with SPDK's result
//! shapes so SPDK tooling reads them unchanged.

use crate::control::registry::{parse_params, Registry};
use crate::net::stats::LcoreCounters;
use crate::storage::manager::StorageControl;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct NoParams {}

/// `spdk_get_version`: `{"version": "hostplane v0.1.0", "fields": {major, minor, patch, suffix}}`.
pub fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let (core, suffix) = v.split_once('-').map_or((v, ""), |(c, s)| (c, s));
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    json!({
        "version": format!("hostplane v{v}"),
        "fields": {"major": major, "minor": minor, "patch": patch, "suffix": if suffix.is_empty() { String::new() } else { format!("-{suffix}") }},
    })
}

/// One reactor line of `framework_get_reactors`. `busy`/`idle` count polls that found work and
/// polls that did not (SPDK counts TSC ticks; the ratio means the same: utilisation).
pub fn reactor_json(lcore: u32, busy: u64, idle: u64) -> Value {
    json!({"lcore": lcore, "busy": busy, "idle": idle, "in_interrupt": false, "lw_threads": []})
}

/// `framework_get_reactors` over the net lcores' poll counters.
pub fn reactors(tick_rate: u64, net_lcores: &[(u32, Arc<LcoreCounters>)]) -> Value {
    let reactors: Vec<Value> = net_lcores
        .iter()
        .map(|(id, c)| {
            let (busy, polls) = (c.busy_polls.get(), c.polls.get());
            reactor_json(*id, busy, polls.saturating_sub(busy))
        })
        .collect();
    json!({"tick_rate": tick_rate, "pid": std::process::id(), "reactors": reactors})
}

/// Registers `spdk_get_version` and `framework_get_reactors` (net lcores, then the storage
/// reactors, whose `busy`/`idle` are TSC ticks as in SPDK).
pub fn register(
    reg: &mut Registry,
    tick_rate: u64,
    net_lcores: Vec<(u32, Arc<LcoreCounters>)>,
    storage: Option<Arc<StorageControl>>,
) {
    reg.register("spdk_get_version", |p| {
        parse_params::<NoParams>(p).map(|_| version())
    });
    reg.register("framework_get_reactors", move |p| {
        parse_params::<NoParams>(p)?;
        let mut v = reactors(tick_rate, &net_lcores);
        if let (Some(st), Some(list)) = (&storage, v["reactors"].as_array_mut()) {
            list.extend(st.reactors_json());
        }
        Ok(v)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_spdk() {
        let v = version();
        assert!(v["version"].as_str().unwrap().starts_with("hostplane v"));
        for k in ["major", "minor", "patch"] {
            assert!(v["fields"][k].is_u64(), "{k}");
        }
        assert!(v["fields"]["suffix"].is_string());
        let c = Arc::new(LcoreCounters::default());
        c.polls.add(10);
        c.busy_polls.add(3);
        let r = reactors(2_000_000_000, &[(1, c)]);
        assert_eq!(r["tick_rate"], 2_000_000_000u64);
        assert_eq!(
            r["reactors"][0],
            json!({"lcore": 1, "busy": 3, "idle": 7, "in_interrupt": false, "lw_threads": []})
        );
    }
}
