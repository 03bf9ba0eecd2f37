//! Storage systems by type name. Adding one means: implement [`BdevBackend`] (and its
//! [`BackendChannel`](super::bdev::BackendChannel)), then [`BackendRegistry::register`] a
//! [`BackendType`] under its name.

use super::bdev::{Bdev, BdevBackend, BdevError};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Backend parameters: a JSON object (TOML tables are converted), parsed by the backend itself.
pub type Params = serde_json::Value;

/// How to make one kind of storage system.
#[derive(Clone, Copy)]
pub struct BackendType {
    /// Checks parameters without touching the storage system (config validation).
    pub check: fn(&Params) -> Result<(), BdevError>,
    /// Creates the backend. May block (e.g. connect to a server) — call it off the reactors.
    pub create: fn(&Params) -> Result<Box<dyn BdevBackend>, BdevError>,
}

/// The registered storage systems.
#[derive(Clone, Default)]
pub struct BackendRegistry {
    types: BTreeMap<String, BackendType>,
}

impl BackendRegistry {
    /// A registry with `malloc`, `null`, `file`, `nbd` and `rbd`.
    pub fn with_builtin() -> BackendRegistry {
        let mut r = BackendRegistry::default();
        r.register("malloc", super::malloc::BACKEND);
        r.register("null", super::null::BACKEND);
        r.register("file", super::file::BACKEND);
        r.register("nbd", super::nbd::BACKEND);
        r.register("rbd", super::rbd::BACKEND);
        r
    }

    /// Adds (or replaces) a storage system.
    pub fn register(&mut self, name: &str, t: BackendType) {
        self.types.insert(name.to_string(), t);
    }

    /// Registered names, comma-separated.
    pub fn names(&self) -> String {
        self.types.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    fn get(&self, type_name: &str) -> Result<&BackendType, BdevError> {
        self.types
            .get(type_name)
            .ok_or_else(|| BdevError::UnknownType {
                name: type_name.into(),
                known: self.names(),
            })
    }

    /// Checks `params` for `type_name` without creating anything.
    pub fn check(&self, type_name: &str, params: &Params) -> Result<(), BdevError> {
        (self.get(type_name)?.check)(params)
    }

    /// Creates a bdev named `name` on storage system `type_name`, behind service queues (so it
    /// can be paused and upgraded, see `upgrade`).
    pub fn create(
        &self,
        type_name: &str,
        name: &str,
        params: &Params,
        read_only: bool,
    ) -> Result<Arc<Bdev>, BdevError> {
        let t = *self.get(type_name)?;
        let backend = (t.create)(params)?;
        let service = super::upgrade::ServiceBackend::new(t, params.clone(), backend);
        Ok(Bdev::new(name, Box::new(service), read_only))
    }
}

/// Parses a backend's parameter struct, naming the backend in errors.
pub fn parse_params<T: DeserializeOwned>(type_name: &str, params: &Params) -> Result<T, BdevError> {
    let p = if params.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        params.clone()
    };
    serde_json::from_value(p).map_err(|e| BdevError::Params(format!("{type_name} params: {e}")))
}

/// Parses `type:key=value,key=value` (the `bench bdev --bdev` form) into a type and params.
/// Values that parse as integers or booleans become numbers/booleans.
pub fn parse_spec(spec: &str) -> Result<(String, Params), BdevError> {
    let (t, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let mut m = serde_json::Map::new();
    for kv in rest.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| BdevError::Params(format!("{kv:?}: expected key=value")))?;
        let val = if let Ok(n) = v.parse::<u64>() {
            serde_json::Value::from(n)
        } else if let Ok(b) = v.parse::<bool>() {
            serde_json::Value::from(b)
        } else {
            serde_json::Value::from(v)
        };
        m.insert(k.to_string(), val);
    }
    Ok((t.to_string(), serde_json::Value::Object(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_type_names_the_known_ones() {
        let r = BackendRegistry::with_builtin();
        let e = r.check("ceph", &Params::Null).unwrap_err().to_string();
        assert!(
            e.contains("ceph") && e.contains("malloc") && e.contains("nbd"),
            "{e}"
        );
        assert!(r
            .check("malloc", &serde_json::json!({"size_mib": 1}))
            .is_ok());
        let e = r
            .check("malloc", &serde_json::json!({"size_mb": 1}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("malloc params") && e.contains("size_mb"), "{e}");
    }

    #[test]
    fn spec() {
        let (t, p) = parse_spec("file:path=/tmp/x,block_size=4096,direct=false").unwrap();
        assert_eq!(t, "file");
        assert_eq!(
            p,
            serde_json::json!({"path": "/tmp/x", "block_size": 4096, "direct": false})
        );
        assert_eq!(parse_spec("null").unwrap().0, "null");
        assert!(parse_spec("malloc:size_mib").is_err());
    }
}
