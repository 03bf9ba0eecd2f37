//! SPDK's JSON config format: the live state as the RPC calls that recreate it from a fresh
//! start, grouped by subsystem.
//!
//! ```json
//! {"subsystems": [{"subsystem": "macnat", "config": [{"method": "macnat_add", "params": {...}}]}]}
//! ```
//! `save_config` writes it, `hostplane run --json FILE` and `load_config` replay it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// One call: method and params.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigCall {
    /// Method name.
    pub method: String,
    /// Params (`null` when the method takes none).
    #[serde(default)]
    pub params: Value,
}

/// One subsystem's calls. SPDK writes `"config": null` for a subsystem with nothing to save.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubsystemConfig {
    /// Subsystem name (`macnat`, `bdev`, `vhost_blk`).
    pub subsystem: String,
    /// Calls, in order.
    #[serde(default)]
    pub config: Option<Vec<ConfigCall>>,
}

/// A whole saved config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JsonConfig {
    /// Subsystems in dependency order.
    pub subsystems: Vec<SubsystemConfig>,
}

/// Why a config file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JsonConfigError {
    /// File error.
    #[error("{path}: {err}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// Not valid JSON or not in the format (the message names the field).
    #[error("{path}: {msg}")]
    Format {
        /// Path.
        path: String,
        /// What is wrong, with the field path.
        msg: String,
    },
}

impl JsonConfig {
    /// Parses a config from text; errors name the field (`subsystems[0].config[2].method`).
    pub fn parse(text: &str, name: &str) -> Result<JsonConfig, JsonConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| JsonConfigError::Format {
            path: name.into(),
            msg: format!("{}: {}", e.path(), e.inner()),
        })
    }

    /// Reads a config file.
    pub fn read(path: &Path) -> Result<JsonConfig, JsonConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| JsonConfigError::Io {
            path: path.display().to_string(),
            err,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Writes the config (pretty, 2-space indent as SPDK does) via a temp file and a rename, so
    /// a crash never leaves half a config behind.
    pub fn write(&self, path: &Path) -> Result<(), JsonConfigError> {
        let io = |err| JsonConfigError::Io {
            path: path.display().to_string(),
            err,
        };
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        serde_json::to_writer_pretty(&mut f, self).map_err(|e| io(e.into()))?;
        f.write_all(b"\n").map_err(io)?;
        f.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// The subsystem named `name`, if present.
    pub fn subsystem(&self, name: &str) -> Option<&SubsystemConfig> {
        self.subsystems.iter().find(|s| s.subsystem == name)
    }

    /// Number of calls.
    pub fn calls(&self) -> usize {
        self.subsystems
            .iter()
            .map(|s| s.config.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_output_and_names_bad_fields() {
        let text = r#"{"subsystems":[{"subsystem":"scheduler","config":null},{"subsystem":"macnat","config":[{"method":"macnat_add","params":{"ip":"10.0.0.2"}},{"method":"rpc_get_methods"}]}]}"#;
        let c = JsonConfig::parse(text, "t").unwrap();
        assert_eq!(c.calls(), 2);
        assert_eq!(
            c.subsystem("macnat").unwrap().config.as_ref().unwrap()[1].params,
            Value::Null
        );
        let e = JsonConfig::parse(
            r#"{"subsystems":[{"subsystem":"x","config":[{"params":{}}]}]}"#,
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("subsystems[0].config[0]") && e.contains("method"),
            "{e}"
        );
    }

    #[test]
    fn write_read_roundtrip() {
        let dir = std::env::temp_dir().join(format!("hp-jsoncfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.json");
        let c = JsonConfig {
            subsystems: vec![SubsystemConfig {
                subsystem: "macnat".into(),
                config: Some(vec![ConfigCall {
                    method: "macnat_add".into(),
                    params: serde_json::json!({"ip": "10.0.0.2"}),
                }]),
            }],
        };
        c.write(&p).unwrap();
        assert_eq!(JsonConfig::read(&p).unwrap(), c);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
