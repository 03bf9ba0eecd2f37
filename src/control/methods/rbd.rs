//! SPDK's `bdev_rbd_create` / `bdev_rbd_delete`, with SPDK's parameter names, so `spdk-rpc
//! bdev_rbd_create POOL IMAGE 512 --config-param mon_host=...` works unchanged.
//!
//! Self-contained on purpose (one [`register`] call): the bdevs live in an [`RbdBdevs`] table
//! until the shared bdev table of the other bdev methods takes them over.

use crate::control::json_config::ConfigCall;
use crate::control::jsonrpc::RpcError;
use crate::control::registry::Registry;
use crate::storage::{BackendRegistry, Bdev};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// `bdev_rbd_create` params: SPDK's (`name`, `pool_name`, `rbd_name`, `block_size`, `user_id`,
/// `config`, `cluster_name`, `uuid`) plus the backend's own (`config_file`, `key_file`,
/// `mon_host`, timeouts) — see docs/rbd.md.
#[derive(Deserialize)]
struct CreateParams {
    name: Option<String>,
    cluster_name: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct DeleteParams {
    name: String,
}

/// The rbd bdevs created over RPC, with the params that recreate them (control plane only).
#[derive(Default)]
pub struct RbdBdevs {
    bdevs: Mutex<BTreeMap<String, (Arc<Bdev>, Value)>>,
}

/// Backend params known to the rbd storage system; SPDK's extra ones (`uuid`, ...) are dropped.
const BACKEND_KEYS: &[&str] = &[
    "pool_name",
    "rbd_name",
    "user_id",
    "config",
    "config_file",
    "key_file",
    "mon_host",
    "block_size",
    "connect_timeout_ms",
    "osd_op_timeout_ms",
    "io_timeout_ms",
    "max_inflight",
];

impl RbdBdevs {
    /// Looks a bdev up by name.
    pub fn get(&self, name: &str) -> Option<Arc<Bdev>> {
        let m = self.bdevs.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(|(b, _)| b.clone())
    }

    /// Every bdev, by name.
    pub fn list(&self) -> Vec<Arc<Bdev>> {
        let m = self.bdevs.lock().unwrap_or_else(|p| p.into_inner());
        m.values().map(|(b, _)| b.clone()).collect()
    }

    /// `bdev_rbd_create`: connects and opens the image (blocking, bounded by the timeouts);
    /// returns the bdev name.
    fn create(&self, p: CreateParams) -> Result<Value, RpcError> {
        if p.cluster_name.is_some() {
            return Err(RpcError::invalid_params(
                "cluster_name: registered clusters (bdev_rbd_register_cluster) are not supported; \
                 give config / config_file (bdevs of the same cluster share one connection anyway)",
            ));
        }
        let params: Map<String, Value> = p
            .rest
            .into_iter()
            .filter(|(k, v)| BACKEND_KEYS.contains(&k.as_str()) && !v.is_null())
            .collect();
        let params = Value::Object(params);
        let mut m = self.bdevs.lock().unwrap_or_else(|e| e.into_inner());
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => (0..)
                .map(|i| format!("Ceph{i}"))
                .find(|n| !m.contains_key(n))
                .unwrap_or_default(),
        };
        if m.contains_key(&name) {
            return Err(RpcError::invalid_params(format!(
                "name: bdev {name:?} already exists"
            )));
        }
        let bdev = BackendRegistry::with_builtin()
            .create("rbd", &name, &params, false)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        m.insert(name.clone(), (bdev, params));
        Ok(json!(name))
    }

    fn delete(&self, p: DeleteParams) -> Result<Value, RpcError> {
        let removed = {
            let mut m = self.bdevs.lock().unwrap_or_else(|e| e.into_inner());
            m.remove(&p.name)
        };
        match removed {
            // Closing the image (and maybe the cluster connection) happens outside the lock.
            Some(b) => {
                drop(b);
                Ok(json!(true))
            }
            None => Err(RpcError::invalid_params(format!(
                "name: no rbd bdev named {:?}",
                p.name
            ))),
        }
    }

    /// The `bdev_rbd_create` calls that recreate every rbd bdev (for the bdev subsystem's
    /// `save_config`).
    pub fn config_calls(&self) -> Vec<ConfigCall> {
        let m = self.bdevs.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(name, (_, params))| {
                let mut p = params.as_object().cloned().unwrap_or_default();
                p.insert("name".into(), json!(name));
                ConfigCall {
                    method: "bdev_rbd_create".into(),
                    params: Value::Object(p),
                }
            })
            .collect()
    }
}

/// Registers `bdev_rbd_create` and `bdev_rbd_delete` on `bdevs`.
pub fn register(reg: &mut Registry, bdevs: Arc<RbdBdevs>) {
    let b = bdevs.clone();
    reg.register_typed("bdev_rbd_create", move |p: CreateParams| b.create(p));
    reg.register_typed("bdev_rbd_delete", move |p: DeleteParams| bdevs.delete(p));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_problem() {
        let mut reg = Registry::new();
        let bdevs = Arc::new(RbdBdevs::default());
        register(&mut reg, bdevs.clone());
        let e = reg
            .call("bdev_rbd_create", json!({"pool_name": "rbd", "rbd_name": "x", "block_size": 512, "cluster_name": "c"}))
            .unwrap_err();
        assert!(e.message.contains("cluster_name"), "{}", e.message);
        let e = reg
            .call(
                "bdev_rbd_create",
                json!({"pool_name": "rbd", "block_size": 512, "uuid": null}),
            )
            .unwrap_err();
        assert!(e.message.contains("rbd_name"), "{}", e.message);
        let e = reg
            .call("bdev_rbd_delete", json!({"name": "nope"}))
            .unwrap_err();
        assert!(e.message.contains("nope"), "{}", e.message);
        assert!(bdevs.config_calls().is_empty());
    }
}
