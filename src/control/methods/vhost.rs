//! vhost-user-blk methods in SPDK's dialect: `vhost_create_blk_controller`,
//! `vhost_get_controllers`, `vhost_delete_controller`, and the `vhost_blk` subsystem of
//! `save_config` (controllers are recreated after the bdevs they serve).

use crate::control::json_config::ConfigCall;
use crate::control::jsonrpc::RpcError;
use crate::control::registry::Registry;
use crate::storage::vhost::{CreateBlkController, VhostControl, VhostError};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

#[derive(Deserialize)]
struct DeleteParams {
    ctrlr: String,
}

#[derive(Deserialize)]
struct GetParams {
    name: Option<String>,
}

fn rpc_error(e: VhostError) -> RpcError {
    match e {
        // SPDK answers EBUSY and EEXIST as invalid params as well.
        VhostError::Param(m) | VhostError::Busy(m) => RpcError::invalid_params(m),
        VhostError::Internal(m) => RpcError::internal(m),
    }
}

/// Registers the vhost methods and the `vhost_blk` subsystem. Register it after the `bdev`
/// subsystem: controllers are recreated after the bdevs they serve.
pub fn register(reg: &mut Registry, vhost: Arc<VhostControl>) {
    let v = vhost.clone();
    reg.register_typed(
        "vhost_create_blk_controller",
        move |p: CreateBlkController| v.create(p).map(|()| Value::Bool(true)).map_err(rpc_error),
    );
    let v = vhost.clone();
    reg.register_typed("vhost_get_controllers", move |p: GetParams| {
        v.list(p.name.as_deref()).map_err(rpc_error)
    });
    let v = vhost.clone();
    reg.register_typed("vhost_delete_controller", move |p: DeleteParams| {
        v.delete(&p.ctrlr)
            .map(|()| Value::Bool(true))
            .map_err(rpc_error)
    });
    // Depend on the subsystems that make bdevs when they are registered (before this one):
    // SPDK's client refuses a dependency on a subsystem that does not exist.
    let deps: Vec<&str> = ["bdev", "convert"]
        .into_iter()
        .filter(|s| reg.has_subsystem(s))
        .collect();
    reg.add_subsystem("vhost_blk", &deps, move || {
        vhost
            .save()
            .into_iter()
            .map(|(method, params)| ConfigCall { method, params })
            .collect()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn control() -> Arc<VhostControl> {
        Arc::new(VhostControl::new(
            std::path::Path::new("/nonexistent"),
            Vec::new(),
            Arc::new(|_: &str| None),
        ))
    }

    #[test]
    fn subsystem_follows_bdev_and_errors_are_params() {
        let mut reg = Registry::new();
        reg.add_subsystem("bdev", &[], Vec::new);
        register(&mut reg, control());
        assert_eq!(
            reg.call("framework_get_subsystems", Value::Null).unwrap(),
            json!([{"subsystem": "bdev", "depends_on": []},
                   {"subsystem": "vhost_blk", "depends_on": ["bdev"]}])
        );
        let e = reg
            .call(
                "vhost_create_blk_controller",
                json!({"ctrlr": "c", "dev_name": "m"}),
            )
            .unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("no storage reactors"), "{}", e.message);
        let e = reg
            .call("vhost_create_blk_controller", json!({"ctrlr": "c"}))
            .unwrap_err();
        assert!(e.message.contains("dev_name"), "{}", e.message);
        let e = reg
            .call("vhost_delete_controller", json!({"ctrlr": "c"}))
            .unwrap_err();
        assert!(e.message.contains("no controller named"), "{}", e.message);
        assert_eq!(
            reg.call("vhost_get_controllers", Value::Null).unwrap(),
            json!([])
        );
        assert!(reg
            .call("vhost_get_controllers", json!({"name": "c"}))
            .is_err());
        let saved = reg.call("save_config", Value::Null).unwrap();
        assert_eq!(
            saved["subsystems"][1],
            json!({"subsystem": "vhost_blk", "config": []})
        );
    }
}
