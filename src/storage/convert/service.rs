//! The conversions of a running hostplane, by name (control plane only; the RPC methods in
//! `control::methods::convert` call it).

use super::{Conversion, ConvertError, ConvertParams, ConvertStatus};
use crate::storage::bdev::Bdev;
use crate::storage::reactor::ReactorHandle;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// One line of `bdev_convert_status`.
#[derive(Clone, Debug, Serialize)]
pub struct ConversionInfo {
    /// Bdev name.
    pub name: String,
    /// Source image.
    pub source: String,
    /// Source format.
    pub source_format: String,
    /// Target.
    pub target: String,
    /// Whether it resumed from an existing map.
    pub resumed: bool,
    /// Progress.
    #[serde(flatten)]
    pub status: ConvertStatus,
}

/// Conversions by name, plus the reactors they can be put on.
pub struct ConvertService {
    reactors: Mutex<Vec<ReactorHandle>>,
    conversions: Mutex<BTreeMap<String, Conversion>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConvertService {
    /// A service over these reactors.
    pub fn new(reactors: Vec<ReactorHandle>) -> Arc<ConvertService> {
        Arc::new(ConvertService {
            reactors: Mutex::new(reactors),
            conversions: Mutex::new(BTreeMap::new()),
        })
    }

    /// `bdev_convert_start`: prepares (may block on file IO: control plane) and attaches.
    pub fn start(&self, p: ConvertParams) -> Result<ConversionInfo, ConvertError> {
        if lock(&self.conversions).contains_key(&p.name) {
            return Err(ConvertError::Params(format!(
                "a conversion named {:?} exists",
                p.name
            )));
        }
        let reactor = lock(&self.reactors)
            .get(p.reactor as usize)
            .cloned()
            .ok_or_else(|| ConvertError::Params(format!("no reactor {}", p.reactor)))?;
        let c = Conversion::prepare(p)?;
        c.attach(&reactor)?;
        let info = Self::info(&c);
        lock(&self.conversions).insert(c.params.name.clone(), c);
        Ok(info)
    }

    fn info(c: &Conversion) -> ConversionInfo {
        ConversionInfo {
            name: c.params.name.clone(),
            source: c.params.source.display().to_string(),
            source_format: c.params.source_format.to_string(),
            target: c.params.target.display().to_string(),
            resumed: c.resumed,
            status: c.stats.status(),
        }
    }

    /// `bdev_convert_status`: one conversion, or all.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<ConversionInfo>, ConvertError> {
        let m = lock(&self.conversions);
        match name {
            Some(n) => m
                .get(n)
                .map(|c| vec![Self::info(c)])
                .ok_or_else(|| ConvertError::Params(format!("no conversion named {n:?}"))),
            None => Ok(m.values().map(Self::info).collect()),
        }
    }

    /// `bdev_convert_pause` / `_resume`: stops or restarts the background converter
    /// (VM-triggered copies always run).
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<ConversionInfo, ConvertError> {
        let m = lock(&self.conversions);
        let c = m
            .get(name)
            .ok_or_else(|| ConvertError::Params(format!("no conversion named {name:?}")))?;
        c.stats.paused.store(paused, Ordering::Relaxed);
        Ok(Self::info(c))
    }

    /// The calls that recreate every conversion after a restart (the `convert` subsystem of
    /// `save_config`, replayed by `hostplane run --json`): an unfinished one as
    /// `bdev_convert_start` with its params — which resumes from the map — followed by
    /// `bdev_convert_pause` when its background converter is paused; a finished one as
    /// `bdev_uring_create` of its target under the same name (it has become a plain target bdev;
    /// a second `bdev_convert_start` on it would be refused).
    pub fn save(&self) -> Vec<(String, serde_json::Value)> {
        let m = lock(&self.conversions);
        let mut calls = Vec::new();
        for c in m.values() {
            let p = &c.params;
            if c.stats.is_done() {
                calls.push((
                    "bdev_uring_create".to_string(),
                    serde_json::json!({
                        "name": p.name,
                        "filename": p.target,
                        "block_size": p.block_size,
                        "direct": p.direct,
                        "reactor": p.reactor,
                    }),
                ));
                continue;
            }
            match serde_json::to_value(p) {
                Ok(v) => calls.push(("bdev_convert_start".to_string(), v)),
                Err(e) => {
                    log::error!("save_config: conversion {}: {e}", p.name);
                    continue;
                }
            }
            if c.stats.paused.load(Ordering::Relaxed) {
                calls.push((
                    "bdev_convert_pause".to_string(),
                    serde_json::json!({ "name": p.name }),
                ));
            }
        }
        calls
    }

    /// The convert bdev of a conversion (what a vhost-user-blk controller attaches to) and the
    /// reactor that owns it.
    pub fn bdev(&self, name: &str) -> Option<(Arc<Bdev>, u32)> {
        lock(&self.conversions)
            .get(name)
            .map(|c| (c.bdev.clone(), c.params.reactor))
    }
}
