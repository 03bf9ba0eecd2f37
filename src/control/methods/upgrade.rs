//! Storage service methods: `bdev_pause`, `bdev_resume`, `bdev_upgrade`,
//! `bdev_get_service_stats` (see docs/upgrade.md).
//!
//! Handlers block their connection thread while a pause drains (bounded by `drain_timeout_ms`);
//! they reach the reactors only through each bdev's service control word.

use crate::control::jsonrpc::RpcError;
use crate::control::registry::Registry;
use crate::storage::upgrade::{ServiceBackend, UpgradeError};
use crate::storage::Bdev;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// The bdevs the methods can see (called per request, so bdevs created later are found).
pub type BdevList = Arc<dyn Fn() -> Vec<Arc<Bdev>> + Send + Sync>;

/// Default drain timeout of `bdev_pause` and `bdev_upgrade`.
pub const DEFAULT_DRAIN_MS: u64 = 5000;
/// Longest drain a caller may ask for.
pub const MAX_DRAIN_MS: u64 = 600_000;

fn default_drain() -> u64 {
    DEFAULT_DRAIN_MS
}

#[derive(Deserialize)]
struct PauseParams {
    name: String,
    #[serde(default = "default_drain")]
    drain_timeout_ms: u64,
}

#[derive(Deserialize)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
struct StatsParams {
    name: Option<String>,
}

/// `{name, drain_timeout_ms?, force?, params?: {...}}` or the new parameters inline.
#[derive(Deserialize)]
struct UpgradeParams {
    name: String,
    #[serde(default = "default_drain")]
    drain_timeout_ms: u64,
    #[serde(default)]
    force: bool,
    params: Option<Value>,
    #[serde(flatten)]
    inline: Map<String, Value>,
}

fn find(bdevs: &BdevList, name: &str) -> Result<Arc<Bdev>, RpcError> {
    bdevs()
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| RpcError::invalid_params(format!("name: no bdev named {name:?}")))
}

fn service(b: &Bdev) -> Result<&ServiceBackend, RpcError> {
    ServiceBackend::of(b).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "name: bdev {:?} has no service queue (cannot pause)",
            b.name()
        ))
    })
}

fn drain(ms: u64) -> Result<Duration, RpcError> {
    if ms > MAX_DRAIN_MS {
        return Err(RpcError::invalid_params(format!(
            "drain_timeout_ms: at most {MAX_DRAIN_MS}"
        )));
    }
    Ok(Duration::from_millis(ms))
}

fn to_value(v: impl serde::Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::internal(e.to_string()))
}

/// Registers the methods over the bdevs `bdevs` lists.
pub fn register(reg: &mut Registry, bdevs: BdevList) {
    let b = bdevs.clone();
    reg.register_typed("bdev_pause", move |p: PauseParams| {
        let bdev = find(&b, &p.name)?;
        let r = service(&bdev)?.pause(drain(p.drain_timeout_ms)?);
        let mut v = to_value(&r)?;
        v["name"] = json!(p.name);
        Ok(v)
    });
    let b = bdevs.clone();
    reg.register_typed("bdev_resume", move |p: NameParams| {
        let bdev = find(&b, &p.name)?;
        let d = service(&bdev)?.resume();
        Ok(json!({"name": p.name, "paused_ms": d.as_secs_f64() * 1e3}))
    });
    let b = bdevs.clone();
    reg.register_typed("bdev_upgrade", move |p: UpgradeParams| {
        let bdev = find(&b, &p.name)?;
        let overlay = match p.params {
            Some(v @ Value::Object(_)) => v,
            Some(_) => return Err(RpcError::invalid_params("params: must be an object")),
            None => Value::Object(p.inline),
        };
        match service(&bdev)?.upgrade(&overlay, drain(p.drain_timeout_ms)?, p.force) {
            Ok(r) => {
                let mut v = to_value(&r)?;
                v["name"] = json!(p.name);
                Ok(v)
            }
            Err(UpgradeError::Params(m)) => Err(RpcError::invalid_params(m)),
            Err(e @ UpgradeError::NotDrained(_)) => {
                let data = match &e {
                    UpgradeError::NotDrained(r) => to_value(r).ok(),
                    _ => None,
                };
                Err(RpcError {
                    data,
                    ..RpcError::new(-32000, format!("bdev {}: {e}", p.name))
                })
            }
            Err(e) => Err(RpcError::new(-32000, format!("bdev {}: {e}", p.name))),
        }
    });
    reg.register_typed("bdev_get_service_stats", move |p: StatsParams| {
        let list = match &p.name {
            Some(n) => vec![find(&bdevs, n)?],
            None => bdevs(),
        };
        let mut out = Vec::new();
        for bdev in &list {
            if let Some(s) = ServiceBackend::of(bdev) {
                let mut v = to_value(s.stats())?;
                v["name"] = json!(bdev.name());
                out.push(v);
            }
        }
        Ok(Value::Array(out))
    });
}
