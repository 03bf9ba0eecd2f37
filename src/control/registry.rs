//! The method registry: name → handler(params) → result, plus the subsystems whose live state
//! `save_config` writes and `load_config` replays.
//!
//! Built once before the server starts, then shared read-only (no lock): handlers carry their
//! own handles (RCU table, message senders to lcores/reactors). Each feature wires its methods
//! with `register_typed` lines in its own `register()`.

use super::json_config::{ConfigCall, JsonConfig, SubsystemConfig};
use super::jsonrpc::RpcError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A method: params (`null` when absent) → result.
pub type Handler = Box<dyn Fn(Value) -> Result<Value, RpcError> + Send + Sync>;

/// A subsystem's live state as the calls that recreate it from a fresh start.
pub type ConfigSaver = Box<dyn Fn() -> Vec<ConfigCall> + Send + Sync>;

/// Methods the registry itself answers (they need the registry).
const BUILTIN: &[&str] = &[
    "rpc_get_methods",
    "framework_get_subsystems",
    "framework_get_config",
    "save_config",
    "load_config",
];

struct Subsystem {
    name: String,
    depends_on: Vec<String>,
    save: ConfigSaver,
}

/// Every method the server answers.
#[derive(Default)]
pub struct Registry {
    methods: BTreeMap<String, Handler>,
    subsystems: Vec<Subsystem>,
}

/// Decodes params into `P` (absent params decode as `{}`). Unknown params are ignored: SPDK's
/// client sends its full parameter sets. Errors name the parameter (`entries[1].ip: ...`).
pub fn parse_params<P: DeserializeOwned>(params: Value) -> Result<P, RpcError> {
    let params = match params {
        Value::Null => Value::Object(Default::default()),
        Value::Array(_) => {
            return Err(RpcError::invalid_params(
                "params: must be an object, not an array",
            ))
        }
        p => p,
    };
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        RpcError::invalid_params(if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        })
    })
}

impl Registry {
    /// An empty registry (the built-in methods are always there).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a method taking raw params.
    pub fn register(
        &mut self,
        name: &str,
        handler: impl Fn(Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        debug_assert!(!BUILTIN.contains(&name), "{name} is built in");
        self.methods.insert(name.to_string(), Box::new(handler));
    }

    /// Adds a method whose params decode into `P` (see [`parse_params`]).
    pub fn register_typed<P: DeserializeOwned + 'static>(
        &mut self,
        name: &str,
        handler: impl Fn(P) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        self.register(name, move |params| handler(parse_params(params)?));
    }

    /// Adds a subsystem to `save_config`/`framework_get_subsystems`, in dependency order
    /// (register dependencies first).
    pub fn add_subsystem(
        &mut self,
        name: &str,
        depends_on: &[&str],
        save: impl Fn() -> Vec<ConfigCall> + Send + Sync + 'static,
    ) {
        self.subsystems.push(Subsystem {
            name: name.into(),
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
            save: Box::new(save),
        });
    }

    /// Whether a subsystem of that name is registered.
    pub fn has_subsystem(&self, name: &str) -> bool {
        self.subsystems.iter().any(|s| s.name == name)
    }

    /// Every method that answers, sorted.
    pub fn method_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .methods
            .keys()
            .cloned()
            .chain(BUILTIN.iter().map(|s| s.to_string()))
            .collect();
        v.sort();
        v
    }

    /// Runs `method`.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "rpc_get_methods" => {
                let _: IgnoredParams = parse_params(params)?;
                Ok(json!(self.method_names()))
            }
            "framework_get_subsystems" => {
                let _: IgnoredParams = parse_params(params)?;
                Ok(Value::Array(
                    self.subsystems
                        .iter()
                        .map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on}))
                        .collect(),
                ))
            }
            "framework_get_config" => {
                let p: GetConfigParams = parse_params(params)?;
                let s = self
                    .subsystems
                    .iter()
                    .find(|s| s.name == p.name)
                    .ok_or_else(|| {
                        RpcError::invalid_params(format!("name: no subsystem named {:?}", p.name))
                    })?;
                serde_json::to_value((s.save)()).map_err(|e| RpcError::internal(e.to_string()))
            }
            "save_config" => {
                let p: SaveConfigParams = parse_params(params)?;
                let cfg = self.save();
                match p.file {
                    None => {
                        serde_json::to_value(&cfg).map_err(|e| RpcError::internal(e.to_string()))
                    }
                    Some(file) => {
                        cfg.write(Path::new(&file))
                            .map_err(|e| RpcError::invalid_params(format!("file: {e}")))?;
                        Ok(json!({"file": file, "calls": cfg.calls()}))
                    }
                }
            }
            "load_config" => {
                let p: LoadConfigParams = parse_params(params)?;
                let cfg = match (p.file, p.subsystems) {
                    (Some(file), None) => JsonConfig::read(Path::new(&file))
                        .map_err(|e| RpcError::invalid_params(format!("file: {e}")))?,
                    (None, Some(subsystems)) => JsonConfig { subsystems },
                    _ => return Err(RpcError::invalid_params(
                        "give either file (a path on the server) or subsystems (the config itself)",
                    )),
                };
                let n = self.load(&cfg, &[])?;
                Ok(json!({"calls": n}))
            }
            _ => match self.methods.get(method) {
                Some(h) => h(params),
                None => Err(RpcError::method_not_found(method)),
            },
        }
    }

    /// The live state of every subsystem, in SPDK's `save_config` format.
    pub fn save(&self) -> JsonConfig {
        JsonConfig {
            subsystems: self
                .subsystems
                .iter()
                .map(|s| SubsystemConfig {
                    subsystem: s.name.clone(),
                    config: Some((s.save)()),
                })
                .collect(),
        }
    }

    /// Replays a config's calls in order, stopping at the first failure (whose message says
    /// which call it was). Subsystems named in `skip` are left out (the caller applied them).
    /// Returns the number of calls made.
    pub fn load(&self, cfg: &JsonConfig, skip: &[&str]) -> Result<usize, RpcError> {
        let mut n = 0;
        for (i, s) in cfg.subsystems.iter().enumerate() {
            if skip.contains(&s.subsystem.as_str()) {
                continue;
            }
            for (j, call) in s.config.iter().flatten().enumerate() {
                self.call(&call.method, call.params.clone())
                    .map_err(|e| RpcError {
                        message: format!(
                            "subsystems[{i}] ({}) config[{j}] {}: {}",
                            s.subsystem, call.method, e.message
                        ),
                        ..e
                    })?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Params accepted and ignored (`rpc_get_methods --current`, ...).
#[derive(Deserialize)]
struct IgnoredParams {}

#[derive(Deserialize)]
struct GetConfigParams {
    name: String,
}

#[derive(Deserialize)]
struct SaveConfigParams {
    file: Option<String>,
}

#[derive(Deserialize)]
struct LoadConfigParams {
    file: Option<String>,
    subsystems: Option<Vec<SubsystemConfig>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Deserialize)]
    struct AddParams {
        #[allow(dead_code)]
        name: String,
        count: u32,
    }

    fn counter_registry() -> (Registry, Arc<Mutex<u32>>) {
        let state = Arc::new(Mutex::new(0u32));
        let mut r = Registry::new();
        let s = state.clone();
        r.register_typed("counter_add", move |p: AddParams| {
            *s.lock().unwrap() += p.count;
            Ok(Value::Bool(true))
        });
        let s = state.clone();
        r.add_subsystem("counter", &[], move || {
            vec![ConfigCall {
                method: "counter_add".into(),
                params: json!({"name": "c", "count": *s.lock().unwrap()}),
            }]
        });
        (r, state)
    }

    #[test]
    fn params_errors_name_the_param_and_extras_are_ignored() {
        let (r, _) = counter_registry();
        let e = r.call("counter_add", json!({"name": "x"})).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("count"), "{}", e.message);
        let e = r
            .call("counter_add", json!({"name": "x", "count": "many"}))
            .unwrap_err();
        assert!(e.message.starts_with("count:"), "{}", e.message);
        let e = r.call("counter_add", json!([1, 2])).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(r
            .call(
                "counter_add",
                json!({"name": "x", "count": 1, "spdk_extra": false})
            )
            .is_ok());
    }

    #[test]
    fn unknown_methods_are_not_found() {
        let (r, _) = counter_registry();
        assert_eq!(r.call("nope", Value::Null).unwrap_err().code, -32601);
        let names = r
            .call(
                "rpc_get_methods",
                json!({"current": true, "include_aliases": false}),
            )
            .unwrap();
        assert!(names.as_array().unwrap().contains(&json!("counter_add")));
    }

    #[test]
    fn save_then_load_replays_the_state() {
        let (r, state) = counter_registry();
        r.call("counter_add", json!({"name": "c", "count": 5}))
            .unwrap();
        let saved = r.call("save_config", Value::Null).unwrap();
        assert_eq!(saved["subsystems"][0]["subsystem"], "counter");
        assert_eq!(
            r.call("framework_get_config", json!({"name": "counter"}))
                .unwrap(),
            saved["subsystems"][0]["config"]
        );
        assert_eq!(
            r.call("framework_get_subsystems", Value::Null).unwrap(),
            json!([{"subsystem": "counter", "depends_on": []}])
        );
        *state.lock().unwrap() = 0;
        assert_eq!(r.call("load_config", saved).unwrap(), json!({"calls": 1}));
        assert_eq!(*state.lock().unwrap(), 5);
        let bad = json!({"subsystems": [{"subsystem": "counter", "config": [{"method": "counter_add", "params": {"name": "c"}}]}]});
        let e = r.call("load_config", bad).unwrap_err();
        assert!(
            e.message.contains("config[0] counter_add") && e.message.contains("count"),
            "{}",
            e.message
        );
    }
}
