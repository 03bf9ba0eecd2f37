//! Network methods: `macnat_add`, `macnat_delete`, `macnat_list`, `macnat_get_stats`,
//! `net_get_ports`, `net_get_stats`, and the `macnat` subsystem of `save_config`.
//!
//! Nothing here touches lcore-owned state: table changes are RCU publishes
//! ([`MacNatTable::add`]/[`MacNatTable::delete`] return once no lcore can see the old version),
//! and counters are single-writer atomics that any thread may read.

use crate::config::MacNatSection;
use crate::control::json_config::ConfigCall;
use crate::control::jsonrpc::RpcError;
use crate::control::registry::{parse_params, Registry};
use crate::net::dataplane::PortRole;
use crate::net::macnat::{MacNatEntry, MacNatError, MacNatTable, MacNatVersion};
use crate::net::packet::{IpKey, MacAddr};
use crate::net::stats::{drop_reasons, CountersSnapshot, LcoreCounters};
use crate::runtime::PortInfo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// Entries per `macnat_add` call in a saved config (keeps each call far below the 1 MiB
/// request limit, so a saved config can also be replayed over the socket).
pub const SAVE_CHUNK: usize = 1024;
/// Default and maximum page size of `macnat_list`.
pub const LIST_DEFAULT: usize = 100;
/// See [`LIST_DEFAULT`].
pub const LIST_MAX: usize = 10_000;

/// What the network methods need from the running dataplane.
pub struct NetControl {
    /// The live table.
    pub table: MacNatTable,
    /// Ports in id order.
    pub ports: Vec<PortInfo>,
    /// (lcore id, counters) of every net lcore.
    pub lcores: Vec<(u32, Arc<LcoreCounters>)>,
}

/// One entry as params give it. The port is a name (or device name) or an ethdev id.
#[derive(Deserialize)]
struct EntryParams {
    ip: String,
    local_mac: String,
    global_mac: String,
    port: Value,
}

#[derive(Deserialize)]
struct EntriesParams {
    entries: Vec<EntryParams>,
}

/// `{entries: [...]}` or one entry's fields; each with the prefix its errors carry.
fn entry_params(params: Value) -> Result<Vec<(String, EntryParams)>, RpcError> {
    if params.get("entries").is_some() {
        let p: EntriesParams = parse_params(params)?;
        if p.entries.is_empty() {
            return Err(RpcError::invalid_params("entries: must not be empty"));
        }
        Ok(p.entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| (format!("entries[{i}]."), e))
            .collect())
    } else {
        Ok(vec![(String::new(), parse_params(params)?)])
    }
}

fn parse_ip(field: &str, s: &str) -> Result<IpKey, RpcError> {
    s.parse::<IpAddr>()
        .map(IpKey::from)
        .map_err(|_| RpcError::invalid_params(format!("{field}: {s:?} is not an IP address")))
}

fn parse_mac(field: &str, s: &str) -> Result<MacAddr, RpcError> {
    s.parse().map_err(|_| {
        RpcError::invalid_params(format!(
            "{field}: {s:?} is not a MAC address (like 02:00:00:00:00:01)"
        ))
    })
}

impl NetControl {
    fn vm_port(&self, field: &str, port: &Value) -> Result<u16, RpcError> {
        let found = match port {
            Value::String(name) => self
                .ports
                .iter()
                .find(|p| &p.name == name || &p.device == name),
            Value::Number(n) => n
                .as_u64()
                .and_then(|id| self.ports.iter().find(|p| u64::from(p.id) == id)),
            _ => {
                return Err(RpcError::invalid_params(format!(
                    "{field}: must be a port name or id"
                )))
            }
        };
        match found {
            Some(p) if p.role == PortRole::Vm => Ok(p.id),
            Some(p) => Err(RpcError::invalid_params(format!(
                "{field}: port {} is the uplink; entries name the VM-side port",
                p.name
            ))),
            None => {
                let vms: Vec<&str> = self
                    .ports
                    .iter()
                    .filter(|p| p.role == PortRole::Vm)
                    .map(|p| p.name.as_str())
                    .collect();
                Err(RpcError::invalid_params(format!(
                    "{field}: no port {port} (vm ports: {})",
                    vms.join(", ")
                )))
            }
        }
    }

    fn port_name(&self, id: u16) -> String {
        self.ports
            .iter()
            .find(|p| p.id == id)
            .map_or_else(|| id.to_string(), |p| p.name.clone())
    }

    fn entry_json(&self, e: &MacNatEntry) -> Value {
        json!({"ip": e.ip.to_string(), "local_mac": e.local.to_string(), "global_mac": e.global.to_string(), "port": self.port_name(e.port)})
    }

    /// `macnat_add`: all entries or none; an existing IP is replaced.
    pub fn macnat_add(&self, params: Value) -> Result<Value, RpcError> {
        let raw = entry_params(params)?;
        let mut entries = Vec::with_capacity(raw.len());
        for (pre, e) in &raw {
            let entry = MacNatEntry {
                ip: parse_ip(&format!("{pre}ip"), &e.ip)?,
                local: parse_mac(&format!("{pre}local_mac"), &e.local_mac)?,
                global: parse_mac(&format!("{pre}global_mac"), &e.global_mac)?,
                port: self.vm_port(&format!("{pre}port"), &e.port)?,
            };
            // Checks one entry alone, so the error names the entry it belongs to.
            MacNatVersion::default()
                .insert(entry)
                .map_err(|err| RpcError::invalid_params(format!("{pre}{err}")))?;
            entries.push(entry);
        }
        self.table.add(&entries).map_err(|err| {
            let pre = match &err {
                MacNatError::LocalMacConflict { local, .. } => raw
                    .iter()
                    .zip(&entries)
                    .find(|(_, e)| e.local == *local)
                    .map(|((p, _), _)| p.as_str()),
                _ => None,
            };
            RpcError::invalid_params(format!("{}{err}", pre.unwrap_or("")))
        })?;
        Ok(json!({"added": entries.len(), "total": self.table.len()}))
    }

    /// `macnat_delete`: `{ip}` or `{ips: [...]}`, all or none.
    pub fn macnat_delete(&self, params: Value) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        struct P {
            ip: Option<String>,
            ips: Option<Vec<String>>,
        }
        let p: P = parse_params(params)?;
        let named: Vec<(String, String)> = match (p.ip, p.ips) {
            (Some(ip), None) => vec![("ip".into(), ip)],
            (None, Some(ips)) if !ips.is_empty() => ips
                .into_iter()
                .enumerate()
                .map(|(i, ip)| (format!("ips[{i}]"), ip))
                .collect(),
            (None, Some(_)) => return Err(RpcError::invalid_params("ips: must not be empty")),
            _ => {
                return Err(RpcError::invalid_params(
                    "ip: give ip (one address) or ips (a list), not both or neither",
                ))
            }
        };
        let keys = named
            .iter()
            .map(|(f, s)| parse_ip(f, s))
            .collect::<Result<Vec<_>, _>>()?;
        let removed = self.table.delete(&keys).map_err(|err| match err {
            MacNatError::NotFound(ip) => {
                let f = named
                    .iter()
                    .zip(&keys)
                    .find(|(_, k)| IpAddr::from(**k) == ip)
                    .map_or("ip", |((f, _), _)| f.as_str());
                RpcError::invalid_params(format!("{f}: {ip} is not in the table"))
            }
            other => RpcError::invalid_params(other.to_string()),
        })?;
        Ok(json!({"deleted": removed.len(), "total": self.table.len()}))
    }

    /// `macnat_list`: `{offset, limit}` → `{total, offset, entries}`, sorted by IP.
    pub fn macnat_list(&self, params: Value) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        struct P {
            #[serde(default)]
            offset: usize,
            limit: Option<usize>,
        }
        let p: P = parse_params(params)?;
        let limit = p.limit.unwrap_or(LIST_DEFAULT);
        if limit == 0 || limit > LIST_MAX {
            return Err(RpcError::invalid_params(format!(
                "limit: must be 1..={LIST_MAX}"
            )));
        }
        let (page, total) = self.table.list(p.offset, limit);
        Ok(
            json!({"total": total, "offset": p.offset, "entries": page.iter().map(|e| self.entry_json(e)).collect::<Vec<_>>()}),
        )
    }

    fn totals(&self) -> CountersSnapshot {
        let mut t = CountersSnapshot::default();
        for (_, c) in &self.lcores {
            t.add(&c.snapshot());
        }
        t
    }

    /// `macnat_get_stats`: table size, translations and drops by reason (zeros included).
    pub fn macnat_get_stats(&self) -> Value {
        let t = self.totals();
        json!({
            "entries": self.table.len(),
            "egress_translated": t.egress_translated,
            "ingress_translated": t.ingress_translated,
            "untouched": t.untouched,
            "dropped": t.dropped(),
            "drops": drops_json(&t),
        })
    }

    /// `net_get_ports`.
    pub fn net_get_ports(&self) -> Value {
        Value::Array(
            self.ports
                .iter()
                .map(|p| {
                    let dev = crate::env::EthPort::from_id(p.id).ok();
                    let link = dev.map(|d| d.link());
                    json!({
                        "id": p.id,
                        "name": p.name,
                        "device": p.device,
                        "driver": dev.map(|d| d.driver()),
                        "role": p.role,
                        "mac": dev.map(|d| MacAddr(d.mac()).to_string()),
                        "rx_queues": p.rx_queues,
                        "tx_queues": self.lcores.len(),
                        "link": link.map(|l| json!({"up": l.up, "speed_mbps": l.speed_mbps})),
                    })
                })
                .collect(),
        )
    }

    /// `net_get_stats`: per lcore, per port (ours and the driver's), totals.
    pub fn net_get_stats(&self) -> Value {
        let lcores: Vec<Value> = self
            .lcores
            .iter()
            .map(|(id, c)| {
                let s = c.snapshot();
                json!({
                    "lcore": id, "rx": s.rx, "tx": s.tx, "tx_full": s.tx_full,
                    "egress_translated": s.egress_translated, "ingress_translated": s.ingress_translated,
                    "untouched": s.untouched, "dropped": s.dropped(), "busy_polls": s.busy_polls, "polls": s.polls,
                })
            })
            .collect();
        let t = self.totals();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let (rx, tx) = t.ports.get(p.id as usize).copied().unwrap_or((0, 0));
                let hw = crate::env::EthPort::from_id(p.id).ok().and_then(|d| d.stats().ok());
                json!({
                    "id": p.id, "name": p.name, "rx": rx, "tx": tx,
                    "driver": hw.map(|h| json!({
                        "ipackets": h.ipackets, "opackets": h.opackets, "ibytes": h.ibytes, "obytes": h.obytes,
                        "imissed": h.imissed, "ierrors": h.ierrors, "oerrors": h.oerrors, "rx_nombuf": h.rx_nombuf,
                    })),
                })
            })
            .collect();
        json!({
            "lcores": lcores,
            "ports": ports,
            "totals": {
                "rx": t.rx, "tx": t.tx, "tx_full": t.tx_full,
                "egress_translated": t.egress_translated, "ingress_translated": t.ingress_translated,
                "untouched": t.untouched, "dropped": t.dropped(), "drops": drops_json(&t),
            },
        })
    }

    /// The `macnat` subsystem of `save_config`: `macnat_add` calls of up to [`SAVE_CHUNK`]
    /// entries, ports by name (ids can change between runs; names are configuration).
    pub fn save(&self) -> Vec<ConfigCall> {
        let (all, _) = self.table.list(0, usize::MAX);
        all.chunks(SAVE_CHUNK)
            .map(|c| ConfigCall { method: "macnat_add".into(), params: json!({"entries": c.iter().map(|e| self.entry_json(e)).collect::<Vec<_>>()}) })
            .collect()
    }
}

fn drops_json(t: &CountersSnapshot) -> Value {
    let mut m = Map::new();
    for r in drop_reasons() {
        m.insert(r.as_str().into(), json!(t.drop_count(r.as_str())));
    }
    m.insert("tx_full".into(), json!(t.tx_full));
    Value::Object(m)
}

/// Registers the network methods and the `macnat` subsystem.
pub fn register(reg: &mut Registry, net: Arc<NetControl>) {
    let n = net.clone();
    reg.register("macnat_add", move |p| n.macnat_add(p));
    let n = net.clone();
    reg.register("macnat_delete", move |p| n.macnat_delete(p));
    let n = net.clone();
    reg.register("macnat_list", move |p| n.macnat_list(p));
    let n = net.clone();
    reg.register("macnat_get_stats", move |p| {
        parse_params::<NoParams>(p).map(|_| n.macnat_get_stats())
    });
    let n = net.clone();
    reg.register("net_get_ports", move |p| {
        parse_params::<NoParams>(p).map(|_| n.net_get_ports())
    });
    let n = net.clone();
    reg.register("net_get_stats", move |p| {
        parse_params::<NoParams>(p).map(|_| n.net_get_stats())
    });
    reg.add_subsystem("macnat", &[], move || net.save());
}

#[derive(Deserialize)]
struct NoParams {}

/// The `macnat` subsystem of a `--json` config as initial table entries (applied when the
/// table is built, before any lcore polls, like the TOML file's `[[macnat]]`). Saved configs
/// hold only `macnat_add`; `macnat_delete` is honoured too so hand-written files work.
pub fn startup_entries(calls: &[ConfigCall]) -> Result<Vec<MacNatSection>, RpcError> {
    let mut out: Vec<MacNatSection> = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let at = |e: RpcError| RpcError {
            message: format!("macnat config[{i}] {}: {}", call.method, e.message),
            ..e
        };
        match call.method.as_str() {
            "macnat_add" => {
                for (pre, e) in entry_params(call.params.clone()).map_err(at)? {
                    let ip = parse_ip(&format!("{pre}ip"), &e.ip).map_err(at)?;
                    parse_mac(&format!("{pre}local_mac"), &e.local_mac).map_err(at)?;
                    parse_mac(&format!("{pre}global_mac"), &e.global_mac).map_err(at)?;
                    let port = match e.port {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        _ => {
                            return Err(at(RpcError::invalid_params(format!(
                                "{pre}port: must be a port name or id"
                            ))))
                        }
                    };
                    out.retain(|s| s.ip.parse::<IpAddr>().map(IpKey::from).ok() != Some(ip));
                    out.push(MacNatSection {
                        ip: e.ip,
                        local_mac: e.local_mac,
                        global_mac: e.global_mac,
                        port,
                    });
                }
            }
            "macnat_delete" => {
                #[derive(Deserialize)]
                struct P {
                    ip: Option<String>,
                    #[serde(default)]
                    ips: Vec<String>,
                }
                let p: P = parse_params(call.params.clone()).map_err(at)?;
                for (j, s) in p.ip.iter().chain(p.ips.iter()).enumerate() {
                    let ip = parse_ip(&format!("ips[{j}]"), s).map_err(at)?;
                    out.retain(|s| s.ip.parse::<IpAddr>().map(IpKey::from).ok() != Some(ip));
                }
            }
            other => {
                return Err(RpcError::invalid_params(format!(
                    "macnat config[{i}]: method {other} does not belong to the macnat subsystem"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetControl {
        let port = |id, name: &str, role| PortInfo {
            id,
            name: name.into(),
            device: format!("net_null{id}"),
            role,
            rx_queues: 1,
        };
        NetControl {
            table: MacNatTable::new(&[], 1).unwrap(),
            ports: vec![
                port(0, "up", PortRole::Uplink),
                port(1, "vm0", PortRole::Vm),
                port(2, "vm1", PortRole::Vm),
            ],
            lcores: vec![(1, Arc::new(LcoreCounters::default()))],
        }
    }

    fn entry(ip: &str, l: u8, port: Value) -> Value {
        json!({"ip": ip, "local_mac": format!("52:54:00:00:00:{l:02x}"), "global_mac": "02:00:00:00:00:01", "port": port})
    }

    fn msg(r: Result<Value, RpcError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code, -32602, "{e:?}");
        e.message
    }

    #[test]
    fn add_list_delete() {
        let n = net();
        n.macnat_add(entry("10.0.0.2", 2, json!("vm0"))).unwrap();
        n.macnat_add(json!({"entries": [entry("10.0.0.3", 3, json!(2)), entry("fd00::4", 4, json!("net_null1"))]})).unwrap();
        let l = n.macnat_list(json!({"offset": 1, "limit": 1})).unwrap();
        assert_eq!(l["total"], 3);
        assert_eq!(l["entries"], json!([entry("10.0.0.3", 3, json!("vm1"))]));
        assert_eq!(
            n.macnat_list(Value::Null).unwrap()["entries"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        n.macnat_delete(json!({"ips": ["10.0.0.2", "fd00::4"]}))
            .unwrap();
        n.macnat_delete(json!({"ip": "10.0.0.3"})).unwrap();
        assert!(n.table.is_empty());
    }

    #[test]
    fn errors_name_the_param() {
        let n = net();
        assert!(msg(n.macnat_add(entry("10.0.0.x", 2, json!("vm0")))).starts_with("ip:"));
        let m = msg(n.macnat_add(json!({"entries": [entry("10.0.0.2", 2, json!("vm0")), entry("10.0.0.3", 3, json!("up"))]})));
        assert!(m.starts_with("entries[1].port:"), "{m}");
        let m = msg(n.macnat_add(
            json!({"entries": [entry("10.0.0.2", 2, json!("vm0")), {"ip": "10.0.0.3"}]}),
        ));
        assert!(m.contains("entries[1]") && m.contains("local_mac"), "{m}");
        let mut bad = entry("10.0.0.2", 2, json!("vm0"));
        bad["global_mac"] = json!("ff:ff:ff:ff:ff:ff");
        assert!(msg(n.macnat_add(bad)).starts_with("global_mac:"));
        assert!(msg(n.macnat_add(entry("10.0.0.2", 2, json!("vm9")))).starts_with("port:"));
        assert!(n.table.is_empty(), "failed adds change nothing");
        n.macnat_add(entry("10.0.0.2", 2, json!("vm0"))).unwrap();
        let mut conflict = entry("10.0.0.5", 2, json!("vm0"));
        conflict["global_mac"] = json!("02:00:00:00:00:09");
        let m =
            msg(n.macnat_add(json!({"entries": [entry("10.0.0.4", 4, json!("vm0")), conflict]})));
        assert!(m.starts_with("entries[1].local_mac:"), "{m}");
        let m = msg(n.macnat_delete(json!({"ips": ["10.0.0.2", "10.0.0.9"]})));
        assert!(m.starts_with("ips[1]:"), "{m}");
        assert_eq!(n.table.len(), 1, "failed deletes change nothing");
        assert!(msg(n.macnat_list(json!({"limit": 0}))).starts_with("limit:"));
        assert!(msg(n.macnat_list(json!({"offset": -1}))).starts_with("offset:"));
    }

    #[test]
    fn save_chunks_and_startup_entries_roundtrip() {
        let n = net();
        let entries: Vec<Value> = (0..(SAVE_CHUNK + 5))
            .map(|i| {
                entry(
                    &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                    (i % 200) as u8 + 1,
                    json!("vm0"),
                )
            })
            .collect();
        // Distinct local MACs bound to one global MAC are fine; reuse of a local MAC too.
        n.macnat_add(json!({ "entries": entries })).unwrap();
        let calls = n.save();
        assert_eq!(calls.len(), 2);
        let sections = startup_entries(&calls).unwrap();
        assert_eq!(sections.len(), SAVE_CHUNK + 5);
        assert_eq!(sections[0].port, "vm0");
        let mut more = calls.clone();
        more.push(ConfigCall {
            method: "macnat_delete".into(),
            params: json!({"ip": sections[0].ip}),
        });
        assert_eq!(startup_entries(&more).unwrap().len(), SAVE_CHUNK + 4);
        more.push(ConfigCall {
            method: "bdev_get_bdevs".into(),
            params: Value::Null,
        });
        assert!(startup_entries(&more).is_err());
    }
}
