//! Storage methods: SPDK's bdev methods (same names, params and result shapes), hostplane's
//! `bdev_nbd_client_*`, the QoS methods, `vm_attach`/`vm_detach`, and the `bdev` subsystem of
//! `save_config`.
//!
//! Every handler goes through [`StorageControl`], which reaches reactor-owned state only by
//! message (with a timeout). Unknown params are ignored (SPDK's client sends its full sets).

use crate::control::json_config::ConfigCall;
use crate::control::jsonrpc::RpcError;
use crate::control::registry::{parse_params, Registry};
use crate::storage::manager::{
    CreateBdev, DiskQosSection, QosDeviceSection, StorageControl, StorageError,
};
use crate::storage::qos::{ClassTable, ClassTableConfig, QosLimitParams};
use crate::storage::routing::VmSection;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// SPDK's `-EEXIST`.
pub const EEXIST: i32 = -17;
/// SPDK's `-EBUSY`.
pub const EBUSY: i32 = -16;

fn rpc_err(e: StorageError) -> RpcError {
    match e {
        StorageError::Param(m) => RpcError::invalid_params(m),
        StorageError::Exists(m) => RpcError::new(EEXIST, m),
        StorageError::Busy(m) => RpcError::new(EBUSY, m),
        StorageError::Internal(m) => RpcError::internal(m),
    }
}

#[derive(Deserialize)]
struct MallocCreate {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    reactor: Option<u32>,
}

#[derive(Deserialize)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    reactor: Option<u32>,
}

#[derive(Deserialize)]
struct UringCreate {
    filename: String,
    name: String,
    block_size: Option<u32>,
    uuid: Option<String>,
    reactor: Option<u32>,
    /// hostplane: create/extend the file to this size.
    size_mib: Option<u64>,
    /// hostplane: try O_DIRECT (default true).
    direct: Option<bool>,
}

#[derive(Deserialize)]
struct NbdCreate {
    name: String,
    /// `unix:/path`, `/path`, `tcp:host:port` or `host:port`.
    address: Option<String>,
    /// A Unix socket path (same as `address: unix:PATH`).
    socket: Option<String>,
    #[serde(default)]
    export: String,
    block_size: Option<u32>,
    reconnect_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_inflight: Option<u32>,
    uuid: Option<String>,
    reactor: Option<u32>,
}

#[derive(Deserialize)]
struct BdevIo {
    name: String,
    #[serde(default = "read")]
    rw: String,
    #[serde(default)]
    offset: u64,
    #[serde(default = "four_k")]
    length: u64,
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "one_usize")]
    queue_depth: usize,
}
fn one_usize() -> usize {
    1
}
fn read() -> String {
    "read".into()
}
fn four_k() -> u64 {
    4096
}
fn one() -> u64 {
    1
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// SPDK sends `names` (a list); older clients `name`.
#[derive(Deserialize)]
struct IostatParams {
    name: Option<String>,
    names: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct MaybeNamed {
    name: Option<String>,
}

/// `bdev_set_qos_limit` (unknown params ignored, unlike [`QosLimitParams`]).
#[derive(Deserialize)]
struct SetQosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

/// Drops `None`s so the saved params are the ones given.
fn compact(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        v => v,
    }
}

/// What a create method makes: the bdev and the params it is saved with.
struct Create<'a> {
    method: &'a str,
    name: String,
    system: &'a str,
    params: Value,
    saved: Value,
    reactor: Option<u32>,
    uuid: Option<String>,
}

fn create(st: &StorageControl, c: Create<'_>) -> Result<Value, RpcError> {
    let uuid = c
        .uuid
        .unwrap_or_else(|| crate::storage::manager::name_uuid(&c.name));
    let mut saved = compact(c.saved);
    saved["name"] = json!(c.name);
    saved["uuid"] = json!(uuid);
    st.create(CreateBdev {
        name: c.name,
        system: c.system.into(),
        params: c.params,
        read_only: false,
        reactor: c.reactor,
        qos: DiskQosSection::default(),
        saved_as: Some((c.method.into(), saved)),
        uuid: Some(uuid),
    })
    .map(Value::String)
    .map_err(rpc_err)
}

/// Registers the storage methods and the `bdev` subsystem of `save_config`.
pub fn register(reg: &mut Registry, st: Arc<StorageControl>) {
    let s = st.clone();
    reg.register_typed("bdev_malloc_create", move |p: MallocCreate| {
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => (0..)
                .map(|i| format!("Malloc{i}"))
                .find(|n| s.bdev(n).is_none())
                .unwrap_or_default(),
        };
        let params = json!({"num_blocks": p.num_blocks, "block_size": p.block_size});
        let saved =
            json!({"num_blocks": p.num_blocks, "block_size": p.block_size, "reactor": p.reactor});
        create(
            &s,
            Create {
                method: "bdev_malloc_create",
                name,
                system: "malloc",
                params,
                saved,
                reactor: p.reactor,
                uuid: p.uuid,
            },
        )
    });
    let s = st.clone();
    reg.register_typed("bdev_null_create", move |p: NullCreate| {
        let params = json!({"num_blocks": p.num_blocks, "block_size": p.block_size});
        let saved =
            json!({"num_blocks": p.num_blocks, "block_size": p.block_size, "reactor": p.reactor});
        create(
            &s,
            Create {
                method: "bdev_null_create",
                name: p.name,
                system: "null",
                params,
                saved,
                reactor: p.reactor,
                uuid: p.uuid,
            },
        )
    });
    let s = st.clone();
    reg.register_typed("bdev_uring_create", move |p: UringCreate| {
        let params = compact(json!({
            "path": p.filename, "block_size": p.block_size, "size_mib": p.size_mib, "direct": p.direct,
        }));
        let saved = json!({
            "filename": p.filename, "block_size": p.block_size, "size_mib": p.size_mib,
            "direct": p.direct, "reactor": p.reactor,
        });
        create(&s, Create { method: "bdev_uring_create", name: p.name, system: "file", params, saved, reactor: p.reactor, uuid: p.uuid })
    });
    let s = st.clone();
    reg.register_typed("bdev_nbd_client_create", move |p: NbdCreate| {
        let address = match (p.address, p.socket) {
            (Some(a), None) => a,
            (None, Some(sock)) => format!("unix:{sock}"),
            _ => {
                return Err(RpcError::invalid_params(
                    "address: give address (unix:/path, host:port) or socket (a Unix path)",
                ))
            }
        };
        let params = compact(json!({
            "address": address, "export": p.export, "block_size": p.block_size,
            "reconnect_timeout_ms": p.reconnect_timeout_ms, "connect_timeout_ms": p.connect_timeout_ms,
            "max_inflight": p.max_inflight,
        }));
        let mut saved = params.clone();
        saved["reactor"] = json!(p.reactor);
        create(&s, Create { method: "bdev_nbd_client_create", name: p.name, system: "nbd", params, saved, reactor: p.reactor, uuid: p.uuid })
    });
    for (method, system) in [
        ("bdev_malloc_delete", "malloc"),
        ("bdev_null_delete", "null"),
        ("bdev_uring_delete", "file"),
        ("bdev_nbd_client_delete", "nbd"),
    ] {
        let s = st.clone();
        reg.register_typed(method, move |p: Named| {
            s.delete(&p.name, Some(system))
                .map(|_| Value::Bool(true))
                .map_err(rpc_err)
        });
    }
    let s = st.clone();
    reg.register_typed("bdev_get_bdevs", move |p: MaybeNamed| {
        s.get_bdevs(p.name.as_deref()).map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_get_iostat", move |p: IostatParams| {
        let names = match (p.name, p.names) {
            (Some(n), _) => Some(vec![n]),
            (None, names) => names,
        };
        s.iostat(names.as_deref()).map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_io", move |p: BdevIo| {
        let write = match p.rw.as_str() {
            "read" => false,
            "write" => true,
            x => {
                return Err(RpcError::invalid_params(format!(
                    "rw: {x:?} is not read or write"
                )))
            }
        };
        s.io(
            &p.name,
            write,
            p.offset,
            p.length,
            p.count,
            p.queue_depth.min(1024),
        )
        .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_set_qos_limit", move |p: SetQosLimit| {
        let l = &p;
        s.set_qos_limit(
            &p.name,
            QosLimitParams {
                rw_ios_per_sec: l.rw_ios_per_sec,
                rw_mbytes_per_sec: l.rw_mbytes_per_sec,
                r_mbytes_per_sec: l.r_mbytes_per_sec,
                w_mbytes_per_sec: l.w_mbytes_per_sec,
            },
        )
        .map(|_| Value::Bool(true))
        .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register("bdev_qos_set_disk", move |p| {
        let mut m: Map<String, Value> = parse_params(p)?;
        let name = match m.remove("name") {
            Some(Value::String(n)) => n,
            _ => return Err(RpcError::invalid_params("name: missing (a bdev name)")),
        };
        let q: DiskQosSection = parse_params(Value::Object(m))?;
        s.set_disk_qos(&name, &q)
            .map(|_| Value::Bool(true))
            .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_qos_set_device", move |p: QosDeviceSection| {
        s.set_device(&p).map(|_| Value::Bool(true)).map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_qos_delete_device", move |p: Named| {
        s.delete_device(&p.name)
            .map(|_| Value::Bool(true))
            .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_qos_set_class_table", move |p: ClassTableConfig| {
        let t = ClassTable::try_from(p)
            .map_err(|e| RpcError::invalid_params(format!("classes: {e}")))?;
        s.set_class_table(t)
            .map(|_| Value::Bool(true))
            .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("bdev_qos_get_class_table", move |_: Map<String, Value>| {
        serde_json::to_value(s.class_table()).map_err(|e| RpcError::internal(e.to_string()))
    });
    let s = st.clone();
    reg.register_typed("bdev_qos_get_stats", move |p: MaybeNamed| {
        s.qos_stats(p.name.as_deref()).map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("vm_attach", move |p: VmSection| {
        let name = p.name.clone();
        s.vm_attach(&p)
            .map(|b| json!({"name": name, "bdevs": b}))
            .map_err(rpc_err)
    });
    let s = st.clone();
    reg.register_typed("vm_detach", move |p: Named| {
        s.vm_detach(&p.name)
            .map(|b| json!({"name": p.name, "deleted": b}))
            .map_err(rpc_err)
    });
    let s = st;
    reg.add_subsystem("bdev", &[], move || {
        s.save()
            .into_iter()
            .map(|(method, params)| ConfigCall { method, params })
            .collect()
    });
}
