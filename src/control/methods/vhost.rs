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

/// Registers the vhost methods and the `vhost_blk` subsystem (after `bdev`, which it needs).
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
    reg.add_subsystem("vhost_blk", &["bdev"], move || {
        vhost
            .save()
            .into_iter()
            .map(|(method, params)| ConfigCall { method, params })
            .collect()
    });
}
