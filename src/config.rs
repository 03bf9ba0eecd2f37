//! The hostplane config file (TOML), validated up front: every error names its field.
//!
//! ```toml
//! [eal]
//! lcores = "0-2"            # as EAL's -l; or lcore_map = "(0-1)@0,2@1" as --lcores
//! main_lcore = 0
//! args = ["--no-huge", "--in-memory"]   # any other EAL arguments, passed as given
//!
//! [net]
//! lcores = "1-2"            # worker lcores that poll ports (default: every worker)
//! unknown_ip = "drop"       # or "forward" (untouched)
//! spoofed = "drop"
//! control = "drop"          # LLDP/STP/LACP/EAPOL, untouched if "forward"
//! flood_port = "vm0"        # where ingress broadcast/multicast go (default: first vm port)
//!
//! [[port]]
//! name = "uplink"
//! device = "net_pcap0"      # ethdev name: a vdev name or a PCI address
//! args = "rx_pcap=in.pcap,tx_pcap=out.pcap"   # vdev arguments: makes hostplane create the vdev
//! role = "uplink"           # or "vm"
//!
//! [[macnat]]
//! ip = "10.0.0.2"
//! local_mac = "52:54:00:00:00:02"
//! global_mac = "02:00:00:00:00:01"
//! port = "vm0"
//!
//! [storage]
//! lcores = "3"              # storage reactor lcores (see docs/storage.md for the defaults)
//! vm_config = "vms.toml"    # more [[vm]] entries, from a file (relative to this one)
//!
//! [[vm]]                    # a VM and its disks; see docs/storage.md
//! name = "vm1"
//! [[vm.disk]]
//! name = "root"
//! system = "malloc"         # storage system: malloc | null | file | nbd
//! params = { size_mib = 64 }
//! ```

use crate::lcores::{lcores_of_map, parse_lcore_list, parse_lcore_map};
use crate::net::dataplane::PortRole;
use crate::net::macnat::MacNatEntry;
use crate::net::nat::Disposition;
use crate::net::packet::{IpKey, MacAddr};
use crate::storage::routing::{VmFile, VmSection};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

/// A config error; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config {path}: {err}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// Syntax, unknown key or wrong type (the parser's message names the key and line).
    #[error("config {path}: {msg}")]
    Parse {
        /// Path.
        path: String,
        /// Parser message.
        msg: String,
    },
    /// A semantic error in one field.
    #[error("config field {field}: {msg}")]
    Field {
        /// Dotted field path, e.g. `port[1].role`.
        field: String,
        /// What is wrong.
        msg: String,
    },
}

fn field(field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        msg: msg.into(),
    }
}

/// `[eal]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EalSection {
    /// `-l` list.
    pub lcores: Option<String>,
    /// `--lcores` map.
    pub lcore_map: Option<String>,
    /// `--main-lcore`.
    pub main_lcore: Option<u32>,
    /// Other EAL arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// `[net]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// Net lcores.
    pub lcores: Option<String>,
    /// Egress from unknown IPs / ingress to unknown IPs.
    #[serde(default)]
    pub unknown_ip: Disposition,
    /// Egress with a known IP but the wrong MAC or port.
    #[serde(default)]
    pub spoofed: Disposition,
    /// LLDP/STP/LACP/EAPOL. Default drop: forwarded untouched, a VM's frames would show the
    /// switch its local MAC.
    #[serde(default)]
    pub control: Disposition,
    /// Port name for ingress broadcast/multicast.
    pub flood_port: Option<String>,
}

/// `[[port]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSection {
    /// Logical name used by `macnat.port` and `net.flood_port`.
    pub name: String,
    /// ethdev device name.
    pub device: String,
    /// vdev arguments; when present hostplane passes `--vdev device,args`.
    pub args: Option<String>,
    /// Uplink or VM side.
    pub role: PortRole,
}

/// `[[macnat]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacNatSection {
    /// VM IP.
    pub ip: String,
    /// VM's own MAC.
    pub local_mac: String,
    /// MAC shown to the network.
    pub global_mac: String,
    /// VM-side port name.
    pub port: String,
}

/// `[storage]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Storage reactor lcores.
    pub lcores: Option<String>,
    /// A file of more `[[vm]]` entries (relative paths are relative to the config file).
    pub vm_config: Option<std::path::PathBuf>,
    /// How long a stopping reactor waits for in-flight IO before failing it (default 5000 ms).
    pub drain_timeout_ms: Option<u64>,
}

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// EAL.
    #[serde(default)]
    pub eal: EalSection,
    /// Networking.
    #[serde(default)]
    pub net: NetSection,
    /// Ports, in order.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSection>,
    /// Initial MAC-NAT entries.
    #[serde(default)]
    pub macnat: Vec<MacNatSection>,
    /// Storage reactors.
    #[serde(default)]
    pub storage: StorageSection,
    /// VMs and their disks (plus those of `storage.vm_config`, appended by [`Config::load`]).
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSection>,
}

/// Lcores EAL will have, and which of them poll ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LcorePlan {
    /// Every EAL lcore.
    pub eal: BTreeSet<u32>,
    /// The main lcore (stats, control).
    pub main: u32,
    /// Worker lcores that run the net loop (empty: no network side).
    pub net: Vec<u32>,
    /// Worker lcores that run storage reactors (empty: no storage side).
    pub storage: Vec<u32>,
}

impl Config {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.display().to_string(),
            err,
        })?;
        let mut cfg = Config::parse(&text, &path.display().to_string())?;
        if let Some(v) = &cfg.storage.vm_config {
            let vpath = if v.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(v)
            } else {
                v.clone()
            };
            let extra = VmFile::load(&vpath).map_err(|m| field("storage.vm_config", m))?;
            cfg.vms.extend(extra.vms);
            cfg.validate_static()?;
        }
        Ok(cfg)
    }

    /// Whether the config asks for a storage side.
    pub fn has_storage(&self) -> bool {
        !self.vms.is_empty() || self.storage.lcores.is_some() || self.storage.vm_config.is_some()
    }

    /// Parses TOML text.
    pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.into(),
            msg: e.to_string(),
        })?;
        cfg.validate_static()?;
        Ok(cfg)
    }

    /// Checks everything that does not need EAL.
    pub fn validate_static(&self) -> Result<(), ConfigError> {
        if self.eal.lcores.is_some() && self.eal.lcore_map.is_some() {
            return Err(field(
                "eal.lcore_map",
                "give either eal.lcores or eal.lcore_map, not both",
            ));
        }
        if let Some(l) = &self.eal.lcores {
            parse_lcore_list(l).map_err(|e| field("eal.lcores", e.to_string()))?;
        }
        if let Some(l) = &self.eal.lcore_map {
            parse_lcore_map(l).map_err(|e| field("eal.lcore_map", e.to_string()))?;
        }
        if let Some(l) = &self.net.lcores {
            parse_lcore_list(l).map_err(|e| field("net.lcores", e.to_string()))?;
        }
        let mut names = BTreeSet::new();
        let mut devices = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.name.is_empty() {
                return Err(field(format!("port[{i}].name"), "must not be empty"));
            }
            if !names.insert(p.name.as_str()) {
                return Err(field(
                    format!("port[{i}].name"),
                    format!("{:?} is used twice", p.name),
                ));
            }
            if !devices.insert(p.device.as_str()) {
                return Err(field(
                    format!("port[{i}].device"),
                    format!("{:?} is used twice", p.device),
                ));
            }
            if p.device.contains([',', ' ']) {
                return Err(field(
                    format!("port[{i}].device"),
                    "a device name has no commas or spaces (put vdev arguments in args)",
                ));
            }
        }
        if !self.ports.is_empty() {
            let uplinks = self
                .ports
                .iter()
                .filter(|p| p.role == PortRole::Uplink)
                .count();
            if uplinks != 1 {
                return Err(field(
                    "port",
                    format!("exactly one port must have role = \"uplink\" ({uplinks} do)"),
                ));
            }
        }
        if let Some(f) = &self.net.flood_port {
            match self.ports.iter().find(|p| &p.name == f) {
                Some(p) if p.role == PortRole::Vm => {}
                Some(_) => return Err(field("net.flood_port", format!("{f:?} is not a vm port"))),
                None => return Err(field("net.flood_port", format!("no port is named {f:?}"))),
            }
        }
        // Without [[port]] the ports come from the command line (vdevs): names are resolved
        // when the dataplane starts; check everything else now.
        self.macnat_entries(|name| {
            if self.ports.is_empty() {
                return Some(0);
            }
            self.ports
                .iter()
                .position(|p| p.name == name && p.role == PortRole::Vm)
                .map(|i| i as u16)
        })?;
        if let Some(l) = &self.storage.lcores {
            parse_lcore_list(l).map_err(|e| field("storage.lcores", e.to_string()))?;
        }
        crate::storage::routing::validate(&self.vms).map_err(|(f, m)| field(f, m))?;
        Ok(())
    }

    /// The MAC-NAT entries, with port names resolved by `port_id`.
    pub fn macnat_entries(
        &self,
        port_id: impl Fn(&str) -> Option<u16>,
    ) -> Result<Vec<MacNatEntry>, ConfigError> {
        let mut out = Vec::with_capacity(self.macnat.len());
        let mut table = crate::net::macnat::MacNatVersion::default();
        for (i, m) in self.macnat.iter().enumerate() {
            let f = |k: &str| format!("macnat[{i}].{k}");
            let ip: IpAddr =
                m.ip.parse()
                    .map_err(|_| field(f("ip"), format!("{:?} is not an IP address", m.ip)))?;
            let local: MacAddr = m.local_mac.parse().map_err(|_| {
                field(
                    f("local_mac"),
                    format!("{:?} is not a MAC address", m.local_mac),
                )
            })?;
            let global: MacAddr = m.global_mac.parse().map_err(|_| {
                field(
                    f("global_mac"),
                    format!("{:?} is not a MAC address", m.global_mac),
                )
            })?;
            let port = port_id(&m.port)
                .ok_or_else(|| field(f("port"), format!("no vm port is named {:?}", m.port)))?;
            let e = MacNatEntry {
                ip: IpKey::from(ip),
                local,
                global,
                port,
            };
            table.insert(e).map_err(|e| {
                let msg = e.to_string();
                let k = msg.split(':').next().unwrap_or("ip").to_string();
                field(
                    f(if ["ip", "local_mac", "global_mac"].contains(&k.as_str()) {
                        &k
                    } else {
                        "ip"
                    }),
                    msg,
                )
            })?;
            out.push(e);
        }
        Ok(out)
    }

    /// Resolves the lcore layout: CLI values override the file.
    pub fn lcore_plan(
        &self,
        cli_list: Option<&str>,
        cli_map: Option<&str>,
        cli_main: Option<u32>,
    ) -> Result<LcorePlan, ConfigError> {
        let eal: BTreeSet<u32> = match (cli_list, cli_map, &self.eal.lcores, &self.eal.lcore_map) {
            (Some(l), _, _, _) => parse_lcore_list(l).map_err(|e| field("-l", e.to_string()))?,
            (None, Some(m), _, _) => {
                lcores_of_map(&parse_lcore_map(m).map_err(|e| field("--lcores", e.to_string()))?)
            }
            (None, None, Some(l), _) => {
                parse_lcore_list(l).map_err(|e| field("eal.lcores", e.to_string()))?
            }
            (None, None, None, Some(m)) => lcores_of_map(
                &parse_lcore_map(m).map_err(|e| field("eal.lcore_map", e.to_string()))?,
            ),
            (None, None, None, None) => default_lcores(),
        };
        let main_field = if cli_main.is_some() {
            "--main-lcore"
        } else {
            "eal.main_lcore"
        };
        let main = match cli_main.or(self.eal.main_lcore) {
            Some(m) if eal.contains(&m) => m,
            Some(m) => {
                return Err(field(
                    main_field,
                    format!(
                        "lcore {m} is not in the EAL lcore set {}",
                        crate::lcores::format_lcore_list(&eal)
                    ),
                ))
            }
            None => *eal.first().ok_or_else(|| field("-l", "no lcores"))?,
        };
        let workers: Vec<u32> = eal.iter().copied().filter(|l| *l != main).collect();
        let check = |name: &str, set: &BTreeSet<u32>| -> Result<(), ConfigError> {
            for id in set {
                if !eal.contains(id) {
                    return Err(field(
                        name,
                        format!(
                            "lcore {id} is not in the EAL lcore set {}",
                            crate::lcores::format_lcore_list(&eal)
                        ),
                    ));
                }
                if *id == main {
                    return Err(field(
                        name,
                        format!("lcore {id} is the main lcore; {name} must be workers"),
                    ));
                }
            }
            Ok(())
        };
        let storage_given = match &self.storage.lcores {
            Some(l) => {
                let set =
                    parse_lcore_list(l).map_err(|e| field("storage.lcores", e.to_string()))?;
                check("storage.lcores", &set)?;
                Some(set)
            }
            None => None,
        };
        let has_storage = self.has_storage();
        let mut net: Vec<u32> = match &self.net.lcores {
            Some(l) => {
                let set = parse_lcore_list(l).map_err(|e| field("net.lcores", e.to_string()))?;
                check("net.lcores", &set)?;
                set.into_iter().collect()
            }
            // A storage-only config: no [[port]], no net.lcores.
            None if has_storage && self.ports.is_empty() => Vec::new(),
            None => workers
                .iter()
                .copied()
                .filter(|l| storage_given.as_ref().is_none_or(|s| !s.contains(l)))
                .collect(),
        };
        let storage: Vec<u32> = match storage_given {
            Some(s) => s.into_iter().collect(),
            None if !has_storage => Vec::new(),
            None if self.net.lcores.is_some() || net.is_empty() => workers.iter().copied().filter(|l| !net.contains(l)).collect(),
            // Net and storage both by default: the last worker becomes the storage reactor.
            None if net.len() >= 2 => net.pop().into_iter().collect(),
            None => {
                return Err(field(
                    "storage.lcores",
                    format!("net and storage need a worker lcore each (EAL lcores {}, main {main}): give more lcores, or set net.lcores and storage.lcores", crate::lcores::format_lcore_list(&eal)),
                ))
            }
        };
        if let Some(l) = net.iter().find(|l| storage.contains(l)) {
            return Err(field(
                "storage.lcores",
                format!("lcore {l} is also a net lcore"),
            ));
        }
        if has_storage && storage.is_empty() {
            return Err(field(
                "storage.lcores",
                format!(
                    "no worker lcore left for storage reactors (EAL lcores {}, main {main})",
                    crate::lcores::format_lcore_list(&eal)
                ),
            ));
        }
        if net.is_empty() && storage.is_empty() {
            return Err(field(
                "net.lcores",
                format!("no worker lcore to poll ports (EAL lcores {}, main {main}): give at least two lcores, e.g. -l 0-1", crate::lcores::format_lcore_list(&eal)),
            ));
        }
        Ok(LcorePlan {
            eal,
            main,
            net,
            storage,
        })
    }
}

/// Default lcores: the first two CPUs this process may run on (main + one net lcore).
fn default_lcores() -> BTreeSet<u32> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(2) as u32;
    if n < 2 {
        // One CPU: two lcores on it still work (the main lcore mostly sleeps).
        return [0, 1].into_iter().collect();
    }
    (0..n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    const PORTS: &str = r#"
[[port]]
name = "up"
device = "net_null0"
role = "uplink"
[[port]]
name = "vm0"
device = "net_null1"
role = "vm"
"#;

    #[test]
    fn errors_name_the_field() {
        assert!(err_of("bogus = 1").contains("bogus"));
        assert!(err_of("[eal]\nlcores = \"0-x\"").contains("eal.lcores"));
        assert!(err_of("[net]\nlcores = \"3-1\"").contains("net.lcores"));
        assert!(err_of("[eal]\nlcores = 5").contains("lcores"));
        assert!(err_of(&format!("{PORTS}\n[net]\nflood_port = \"up\"")).contains("net.flood_port"));
        let m = err_of(&format!("{PORTS}\n[[macnat]]\nip = \"10.0.0.300\"\nlocal_mac = \"52:54:00:00:00:01\"\nglobal_mac = \"02:00:00:00:00:01\"\nport = \"vm0\""));
        assert!(m.contains("macnat[0].ip"), "{m}");
        let m = err_of(&format!("{PORTS}\n[[macnat]]\nip = \"10.0.0.3\"\nlocal_mac = \"52:54:00:00:00:01\"\nglobal_mac = \"ff:ff:ff:ff:ff:ff\"\nport = \"vm0\""));
        assert!(m.contains("macnat[0].global_mac"), "{m}");
        let m = err_of(&format!("{PORTS}\n[[macnat]]\nip = \"10.0.0.3\"\nlocal_mac = \"52:54:00:00:00:01\"\nglobal_mac = \"02:00:00:00:00:01\"\nport = \"up\""));
        assert!(m.contains("macnat[0].port"), "{m}");
        assert!(err_of("[[port]]\nname = \"a\"\ndevice = \"x\"\nrole = \"vm\"").contains("uplink"));
        assert!(
            err_of("[[port]]\nname = \"a\"\ndevice = \"x\"\nrole = \"sideways\"").contains("role")
        );
    }

    #[test]
    fn lcore_plan_checks_membership() {
        let c = Config::parse("[eal]\nlcores = \"0-1\"\n[net]\nlcores = \"2\"", "t").unwrap();
        assert!(c
            .lcore_plan(None, None, None)
            .unwrap_err()
            .to_string()
            .contains("net.lcores"));
        let c = Config::parse("[eal]\nlcores = \"0-2\"", "t").unwrap();
        let p = c.lcore_plan(None, None, Some(1)).unwrap();
        assert_eq!((p.main, p.net.clone()), (1, vec![0, 2]));
        assert!(c
            .lcore_plan(None, None, Some(7))
            .unwrap_err()
            .to_string()
            .contains("--main-lcore"));
        let p = c.lcore_plan(None, Some("(0-1)@0,2@0"), None).unwrap();
        assert_eq!(p.net, vec![1, 2]);
        assert!(c
            .lcore_plan(Some("0"), None, None)
            .unwrap_err()
            .to_string()
            .contains("worker"));
    }

    #[test]
    fn storage_lcores() {
        let vm = "[[vm]]\nname = \"a\"\n[[vm.disk]]\nname = \"d\"\nsystem = \"malloc\"\nparams = { size_mib = 1 }\n";
        // Storage only: every worker is a reactor, no net lcores.
        let c = Config::parse(&format!("[eal]\nlcores = \"0-2\"\n{vm}"), "t").unwrap();
        let p = c.lcore_plan(None, None, None).unwrap();
        assert_eq!((p.net.clone(), p.storage.clone()), (vec![], vec![1, 2]));
        // Net and storage by default: the last worker is the reactor.
        let c = Config::parse(&format!("[eal]\nlcores = \"0-2\"\n{PORTS}\n{vm}"), "t").unwrap();
        let p = c.lcore_plan(None, None, None).unwrap();
        assert_eq!((p.net.clone(), p.storage.clone()), (vec![1], vec![2]));
        assert!(c
            .lcore_plan(Some("0-1"), None, None)
            .unwrap_err()
            .to_string()
            .contains("storage.lcores"));
        // Explicit.
        let c = Config::parse(
            &format!("[eal]\nlcores = \"0-3\"\n[storage]\nlcores = \"1\"\n{PORTS}"),
            "t",
        )
        .unwrap();
        let p = c.lcore_plan(None, None, None).unwrap();
        assert_eq!((p.net.clone(), p.storage.clone()), (vec![2, 3], vec![1]));
        let c = Config::parse(
            "[eal]\nlcores = \"0-3\"\n[storage]\nlcores = \"1\"\n[net]\nlcores = \"1-2\"",
            "t",
        )
        .unwrap();
        assert!(c
            .lcore_plan(None, None, None)
            .unwrap_err()
            .to_string()
            .contains("also a net lcore"));
        let c = Config::parse("[storage]\nlcores = \"0\"", "t").unwrap();
        assert!(c
            .lcore_plan(Some("0-1"), None, None)
            .unwrap_err()
            .to_string()
            .contains("main lcore"));
        assert!(err_of("[storage]\nlanes = 1").contains("lanes"));
        assert!(err_of("[[vm]]\nname = \"\"").contains("vm[0].name"));
        assert!(err_of("[[vm]]\nname = \"a\"\n[[vm.disk]]\nname = \"d\"").contains("system"));
    }

    #[test]
    fn good_config_resolves_entries() {
        let c = Config::parse(&format!("{PORTS}\n[[macnat]]\nip = \"fd00::2\"\nlocal_mac = \"52:54:00:00:00:01\"\nglobal_mac = \"02:00:00:00:00:01\"\nport = \"vm0\""), "t").unwrap();
        let e = c.macnat_entries(|n| (n == "vm0").then_some(7)).unwrap();
        assert_eq!(e[0].port, 7);
    }
}
