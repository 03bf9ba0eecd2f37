//! Online disk conversion: `bdev_convert_start`, `bdev_convert_status`, `bdev_convert_pause`,
//! `bdev_convert_resume` (see docs/convert.md).

use crate::control::jsonrpc::RpcError;
use crate::control::registry::Registry;
use crate::storage::convert::service::ConvertService;
use crate::storage::convert::{ConvertError, ConvertParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct NameParam {
    name: String,
}

#[derive(Deserialize)]
struct OptName {
    #[serde(default)]
    name: Option<String>,
}

fn err(e: ConvertError) -> RpcError {
    match e {
        ConvertError::Params(m) => RpcError::invalid_params(m),
        e => RpcError::internal(e.to_string()),
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::internal(e.to_string()))
}

/// Registers the conversion methods on `svc`.
pub fn register(reg: &mut Registry, svc: Arc<ConvertService>) {
    let s = svc.clone();
    reg.register_typed("bdev_convert_start", move |p: ConvertParams| {
        to_value(s.start(p).map_err(err)?)
    });
    let s = svc.clone();
    reg.register_typed("bdev_convert_status", move |p: OptName| {
        let v = s.status(p.name.as_deref()).map_err(err)?;
        Ok(json!({ "conversions": to_value(v)? }))
    });
    let s = svc.clone();
    reg.register_typed("bdev_convert_pause", move |p: NameParam| {
        to_value(s.set_paused(&p.name, true).map_err(err)?)
    });
    let s = svc.clone();
    reg.register_typed("bdev_convert_resume", move |p: NameParam| {
        to_value(s.set_paused(&p.name, false).map_err(err)?)
    });
    // After `bdev` (a finished conversion is saved as a file bdev) and before `vhost_blk` (a
    // controller may serve a converting disk).
    let deps: &[&str] = if reg.has_subsystem("bdev") {
        &["bdev"]
    } else {
        &[]
    };
    reg.add_subsystem("convert", deps, move || {
        svc.save()
            .into_iter()
            .map(|(method, params)| crate::control::ConfigCall { method, params })
            .collect()
    });
}
