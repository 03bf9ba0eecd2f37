//! `null`: discards writes, reads zeros. For measuring the layers above a backend.

use super::bdev::{
    BackendChannel, BdevBackend, BdevError, BdevInfo, Completions, IoKind, IoRequest, IoStatus,
};
use super::malloc::{check_geometry, default_bs, size_bytes};
use super::registry::{parse_params, BackendType, Params};
use serde::Deserialize;

/// `null` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullParams {
    /// Size in MiB (give this or `num_blocks`).
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// Size in blocks.
    #[serde(default)]
    pub num_blocks: Option<u64>,
    /// Block size in bytes (default 512).
    #[serde(default = "default_bs")]
    pub block_size: u32,
}

fn parse(p: &Params) -> Result<NullParams, BdevError> {
    let n: NullParams = parse_params("null", p)?;
    check_geometry("null", n.size_mib, n.num_blocks, n.block_size)?;
    Ok(n)
}

/// Registry entry.
pub const BACKEND: BackendType = BackendType {
    check: |p| parse(p).map(|_| ()),
    create: |p| {
        let n = parse(p)?;
        Ok(Box::new(NullBackend {
            info: BdevInfo {
                block_size: n.block_size,
                num_blocks: size_bytes(n.size_mib, n.num_blocks, n.block_size)
                    / u64::from(n.block_size),
                read_only: false,
                max_io_bytes: 0,
            },
        }))
    },
};

/// The null storage system.
pub struct NullBackend {
    info: BdevInfo,
}

impl BdevBackend for NullBackend {
    fn type_name(&self) -> &'static str {
        "null"
    }
    fn info(&self) -> BdevInfo {
        self.info.clone()
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(NullChannel))
    }
}

struct NullChannel;

impl BackendChannel for NullChannel {
    fn submit(&mut self, mut req: IoRequest, done: &mut Completions) {
        if req.kind == IoKind::Read {
            if let Some(b) = req.buf.as_mut() {
                b.as_mut_slice().fill(0);
            }
        }
        done.push(req, IoStatus::Success);
    }
    fn poll(&mut self, _done: &mut Completions) -> usize {
        0
    }
    fn inflight(&self) -> usize {
        0
    }
    fn abort(&mut self, _done: &mut Completions) {}
}
