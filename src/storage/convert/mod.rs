//! Online virtual-disk format conversion (copy-before-IO).
//!
//! A `convert` bdev serves a VM's disk from the **target** (raw: a file, or any bdev) while the
//! data still sits in the **source** image (raw, qcow2, flat vmdk via `imago`; sparse vmdk via
//! [`vmdk`]). A persistent conversion map ([`map`]) says which grains the target already holds. A
//! VM request touching unconverted grains first has them copied (source read on helper threads,
//! [`source`]; target write on the reactor), then runs on the target; a background converter
//! walks the remaining grains at a configurable rate. When every grain is converted the source is released, the map deleted, and
//! the bdev passes everything straight to the target.
//!
//! Threads: the conversion state ([`core`]) is owned by one reactor — the one [`Conversion::attach`]
//! puts it on; channels of the convert bdev can only be opened there. Source reads and map writes
//! run on two helper threads per conversion and complete by message (queues the reactor drains).
//! Progress counters are single-writer atomics read by the control plane.
//!
//! Order of operations and why a crash at any instant is safe: see docs/convert.md and [`core`].

mod core;
pub mod map;
pub mod source;
pub mod vmdk;

use self::core::{Core, CoreInit, Out};
use crate::storage::bdev::{
    BackendChannel, Bdev, BdevBackend, BdevError, BdevInfo, Completions, IoRequest, IoStatus,
};
use crate::storage::reactor::{PollStatus, Poller, Reactor, ReactorHandle};
use ahash::AHashMap;
use serde::{Deserialize, Serialize};
use source::{SourceFormat, SourceReader};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why a conversion could not start (the VM keeps its source; nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source image cannot be read (missing, wrong format, corrupt, truncated).
    #[error("source: {0}")]
    Source(String),
    /// The target cannot be used.
    #[error("target: {0}")]
    Target(String),
    /// The conversion map cannot be created, read or written.
    #[error("conversion map: {0}")]
    Map(String),
    /// Bad parameters.
    #[error("{0}")]
    Params(String),
    /// The reactor is gone or refused.
    #[error("reactor: {0}")]
    Reactor(String),
}

fn default_grain() -> u64 {
    65536
}
fn default_bs() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

/// `bdev_convert_start` parameters (also `hostplane convert`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvertParams {
    /// Name of the convert bdev.
    pub name: String,
    /// Source image path (opened read-only).
    pub source: PathBuf,
    /// `raw`, `qcow2` or `vmdk`.
    pub source_format: SourceFormat,
    /// Target raw file (created, or extended to the source's size); the map goes next to it.
    pub target: PathBuf,
    /// Bytes per grain (map granularity): a multiple of the block size (default 64 KiB).
    #[serde(default = "default_grain")]
    pub grain_size: u64,
    /// Background rate limit in MiB/s (0 = unlimited; VM-triggered copies are never limited).
    #[serde(default)]
    pub rate_mib: u64,
    /// Block size of the target bdev (default 512).
    #[serde(default = "default_bs")]
    pub block_size: u32,
    /// Map path (default `<target>.convmap`).
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// Open the target with O_DIRECT (default true; falls back to buffered where refused).
    #[serde(default = "default_true")]
    pub direct: bool,
    /// Reactor that owns the conversion (default 0).
    #[serde(default)]
    pub reactor: u32,
}

/// Progress counters: written by the owning reactor, read by anyone.
#[derive(Debug)]
pub struct ConvertStats {
    /// Bytes per grain.
    pub grain_size: u64,
    /// Grains in the disk.
    pub total_grains: u64,
    /// Grains whose bit is persisted.
    pub done_grains: AtomicU64,
    /// Grains already done when this run started (a resumed conversion).
    pub resumed_grains: u64,
    /// Source bytes copied by this run (zero ranges included, written as write-zeroes).
    pub bytes_copied: AtomicU64,
    /// Copies a VM request triggered.
    pub vm_copies: AtomicU64,
    /// Copies the background converter made.
    pub bg_copies: AtomicU64,
    /// VM reads served straight from fetched source data.
    pub reads_from_copy: AtomicU64,
    /// Failed source reads or target writes (retried).
    pub errors: AtomicU64,
    /// Background converter paused (VM-triggered copies continue).
    pub paused: AtomicBool,
    /// Background rate limit, bytes/s (0 = unlimited).
    pub rate_bytes: AtomicU64,
    done: AtomicBool,
    started: Instant,
    finished_ms: AtomicU64,
}

impl ConvertStats {
    fn new(grain_size: u64, total: u64, done: u64, rate_mib: u64) -> ConvertStats {
        ConvertStats {
            grain_size,
            total_grains: total,
            done_grains: AtomicU64::new(done),
            resumed_grains: done,
            bytes_copied: AtomicU64::new(0),
            vm_copies: AtomicU64::new(0),
            bg_copies: AtomicU64::new(0),
            reads_from_copy: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            rate_bytes: AtomicU64::new(rate_mib.saturating_mul(1 << 20)),
            done: AtomicBool::new(false),
            started: Instant::now(),
            finished_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_done(&self) {
        self.finished_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
    }

    /// Whether every grain is converted and the map is deleted.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// A snapshot for `bdev_convert_status`.
    pub fn status(&self) -> ConvertStatus {
        let done = self.done_grains.load(Ordering::Relaxed);
        let finished = self.is_done();
        let elapsed = if finished {
            self.finished_ms.load(Ordering::Relaxed) as f64 / 1000.0
        } else {
            self.started.elapsed().as_secs_f64()
        };
        let this_run = done.saturating_sub(self.resumed_grains) as f64 * self.grain_size as f64;
        let mib_s = if elapsed > 0.0 {
            this_run / elapsed / (1u64 << 20) as f64
        } else {
            0.0
        };
        let left = self.total_grains.saturating_sub(done) as f64 * self.grain_size as f64;
        let eta = if finished {
            Some(0.0)
        } else if mib_s > 0.0 {
            Some(left / (mib_s * (1u64 << 20) as f64))
        } else {
            None
        };
        ConvertStatus {
            state: if finished {
                "done"
            } else if self.paused.load(Ordering::Relaxed) {
                "paused"
            } else {
                "converting"
            }
            .into(),
            grains_done: done,
            grains_total: self.total_grains,
            grain_size: self.grain_size,
            percent: if self.total_grains == 0 {
                100.0
            } else {
                100.0 * done as f64 / self.total_grains as f64
            },
            mib_per_s: mib_s,
            eta_s: eta,
            elapsed_s: elapsed,
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            vm_copies: self.vm_copies.load(Ordering::Relaxed),
            bg_copies: self.bg_copies.load(Ordering::Relaxed),
            reads_from_copy: self.reads_from_copy.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            rate_mib: self.rate_bytes.load(Ordering::Relaxed) >> 20,
        }
    }
}

/// Progress of one conversion.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConvertStatus {
    /// `converting`, `paused` or `done`.
    pub state: String,
    /// Grains converted.
    pub grains_done: u64,
    /// Grains in the disk.
    pub grains_total: u64,
    /// Bytes per grain.
    pub grain_size: u64,
    /// grains_done / grains_total, in %.
    pub percent: f64,
    /// Conversion rate of this run.
    pub mib_per_s: f64,
    /// Seconds left at that rate (`None` before any progress).
    pub eta_s: Option<f64>,
    /// Seconds since this run started (until done).
    pub elapsed_s: f64,
    /// Source bytes copied by this run.
    pub bytes_copied: u64,
    /// Copies triggered by VM requests.
    pub vm_copies: u64,
    /// Background copies.
    pub bg_copies: u64,
    /// VM reads served from fetched source data.
    pub reads_from_copy: u64,
    /// Failed (and retried) copies.
    pub errors: u64,
    /// Background rate limit (0 = unlimited).
    pub rate_mib: u64,
}

struct Shared {
    uid: u64,
    init: Mutex<Option<CoreInit>>,
    target: Arc<Bdev>,
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    // The conversions owned by this reactor thread, by uid: how `open_channel` finds its core.
    static CORES: RefCell<AHashMap<u64, Rc<RefCell<Core>>>> = RefCell::new(AHashMap::new());
}

struct ConvertBackend {
    shared: Arc<Shared>,
    info: BdevInfo,
}

impl BdevBackend for ConvertBackend {
    fn type_name(&self) -> &'static str {
        "convert"
    }
    fn info(&self) -> BdevInfo {
        self.info.clone()
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let core = CORES.with(|c| c.borrow().get(&self.shared.uid).cloned());
        match core {
            Some(core) => Ok(Box::new(ConvertChannel {
                core,
                out: Rc::new(RefCell::new(Default::default())),
                inflight: 0,
            })),
            None => Err(BdevError::Backend(
                "a convert bdev is served by the reactor that owns its conversion: open its \
                 channels there"
                    .into(),
            )),
        }
    }
}

struct ConvertChannel {
    core: Rc<RefCell<Core>>,
    out: Out,
    inflight: usize,
}

impl ConvertChannel {
    fn drain(&mut self, done: &mut Completions) -> usize {
        let mut n = 0;
        while let Some((r, st)) = self.out.borrow_mut().pop_front() {
            done.push(r, st);
            n += 1;
        }
        self.inflight -= n.min(self.inflight);
        n
    }
}

impl BackendChannel for ConvertChannel {
    fn submit(&mut self, req: IoRequest, done: &mut Completions) {
        match self.core.try_borrow_mut() {
            Ok(mut c) => {
                self.inflight += 1;
                c.submit(req, &self.out);
            }
            // Only reachable if a completion callback of this conversion submitted from inside
            // the core's own poll, which no path does.
            Err(_) => done.push(req, IoStatus::IoError(libc::EBUSY)),
        }
    }
    fn poll(&mut self, done: &mut Completions) -> usize {
        let n = self
            .core
            .try_borrow_mut()
            .map(|mut c| c.poll())
            .unwrap_or(0);
        n + self.drain(done)
    }
    fn inflight(&self) -> usize {
        self.inflight
    }
    fn abort(&mut self, done: &mut Completions) {
        // What the core still holds completes into `out` later, or is dropped with it (a dropped
        // request fires its callback with Aborted).
        self.drain(done);
    }
}

struct ConvertPoller {
    uid: u64,
    core: Rc<RefCell<Core>>,
}

impl Poller for ConvertPoller {
    fn poll(&mut self, _r: &mut Reactor) -> PollStatus {
        PollStatus::from_count(
            self.core
                .try_borrow_mut()
                .map(|mut c| c.poll())
                .unwrap_or(0),
        )
    }
    fn stop(&mut self, _r: &mut Reactor) {
        if let Ok(mut c) = self.core.try_borrow_mut() {
            c.stop();
        }
        CORES.with(|c| c.borrow_mut().remove(&self.uid));
    }
    fn inflight(&self) -> usize {
        self.core.try_borrow().map(|c| c.inflight()).unwrap_or(0)
    }
}

/// A conversion prepared on the control plane: the source opened and checked, the map created or
/// loaded, the target opened. [`Conversion::attach`] starts it on a reactor.
pub struct Conversion {
    /// The convert bdev (serve the VM from it).
    pub bdev: Arc<Bdev>,
    /// Progress.
    pub stats: Arc<ConvertStats>,
    /// What was asked.
    pub params: ConvertParams,
    /// True when an existing map was found and the conversion resumes.
    pub resumed: bool,
    shared: Arc<Shared>,
}

fn target_state(path: &Path, map_exists: bool) -> Result<Option<std::fs::Metadata>, ConvertError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConvertError::Target(format!("{}: {e}", path.display()))),
        Ok(m) if m.is_file() && m.len() > 0 && !map_exists => Err(ConvertError::Target(format!(
            "{} exists and has no conversion map: it is not a conversion in progress (a finished \
             one, or another disk); refusing to overwrite it",
            path.display()
        ))),
        Ok(m) => Ok(Some(m)),
    }
}

impl Conversion {
    /// Prepares a conversion into a raw target file (`params.target`).
    pub fn prepare(params: ConvertParams) -> Result<Conversion, ConvertError> {
        Self::prepare_on(params, None)
    }

    /// Prepares a conversion; `target` overrides `params.target` as the bdev written to (the map
    /// still goes to `params.map` or next to `params.target`).
    pub fn prepare_on(
        params: ConvertParams,
        target: Option<Arc<Bdev>>,
    ) -> Result<Conversion, ConvertError> {
        let bs = u64::from(params.block_size.max(1));
        let g = params.grain_size;
        if g < bs || !g.is_multiple_of(bs) || g > (64 << 20) {
            return Err(ConvertError::Params(format!(
                "grain_size {g}: must be a multiple of the block size ({bs}) and at most 64 MiB"
            )));
        }
        let src = SourceReader::open(&params.source, params.source_format)?;
        let size = src.size();
        if size % bs != 0 {
            return Err(ConvertError::Source(format!(
                "size {size} is not a multiple of the block size {bs}"
            )));
        }
        let source = std::fs::canonicalize(&params.source)
            .map_err(|e| ConvertError::Source(format!("{}: {e}", params.source.display())))?;
        let header = map::MapHeader {
            source: source.to_string_lossy().into_owned(),
            source_format: params.source_format,
            grain_size: g,
            size,
        };
        let map_path = params
            .map
            .clone()
            .unwrap_or_else(|| map::default_map_path(&params.target));
        let map_exists = map_path.exists();
        // Check the target fully before creating anything.
        let file_target = if let Some(t) = &target {
            if t.info().size() < size || t.info().read_only {
                return Err(ConvertError::Target(format!(
                    "bdev {} ({} bytes{}) cannot hold the source ({size} bytes)",
                    t.name(),
                    t.info().size(),
                    if t.info().read_only {
                        ", read-only"
                    } else {
                        ""
                    }
                )));
            }
            None
        } else {
            Some(target_state(&params.target, map_exists)?)
        };
        // A file this run creates or extends from empty reads as zeros where nothing was written.
        let zero_target = !map_exists
            && match &file_target {
                Some(None) => true,
                Some(Some(m)) => m.is_file() && m.len() == 0,
                None => false,
            };
        let (bits, resumed) = if map_exists {
            (map::load(&map_path, &header)?, true)
        } else {
            (map::create(&map_path, &header)?, false)
        };
        let target = match (target, file_target) {
            (Some(t), _) => t,
            (None, meta) => {
                let meta = meta.flatten();
                let is_file = meta.as_ref().is_none_or(|m| m.is_file());
                if is_file && meta.as_ref().is_none_or(|m| m.len() < size) {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&params.target)
                        .and_then(|f| f.set_len(size).and_then(|_| f.sync_all()));
                    if let Err(e) = f {
                        if !resumed {
                            let _ = std::fs::remove_file(&map_path);
                        }
                        return Err(ConvertError::Target(format!(
                            "{}: {e}",
                            params.target.display()
                        )));
                    }
                }
                let p = serde_json::json!({
                    "path": params.target,
                    "block_size": params.block_size,
                    "direct": params.direct,
                });
                let t = crate::storage::BackendRegistry::with_builtin()
                    .create("file", &format!("{}.target", params.name), &p, false)
                    .map_err(|e| ConvertError::Target(e.to_string()));
                match t {
                    Ok(t) if t.info().size() >= size => t,
                    other => {
                        if !resumed {
                            let _ = std::fs::remove_file(&map_path);
                        }
                        return Err(other.err().unwrap_or_else(|| {
                            ConvertError::Target(format!(
                                "{} is smaller than the source ({size} bytes)",
                                params.target.display()
                            ))
                        }));
                    }
                }
            }
        };
        let writer = map::MapWriter::start(&map_path)?;
        let stats = Arc::new(ConvertStats::new(
            g,
            bits.len(),
            bits.ones(),
            params.rate_mib,
        ));
        let init = CoreInit {
            source: src,
            map: writer,
            converted: bits,
            grain: g,
            src_size: size,
            stats: stats.clone(),
            zero_target,
        };
        let shared = Arc::new(Shared {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            init: Mutex::new(Some(init)),
            target: target.clone(),
        });
        let bdev = Bdev::new(
            params.name.clone(),
            Box::new(ConvertBackend {
                shared: shared.clone(),
                info: target.info().clone(),
            }),
            false,
        );
        Ok(Conversion {
            bdev,
            stats,
            params,
            resumed,
            shared,
        })
    }

    /// Starts the conversion on the reactor behind `reactor` (which then owns it: open the
    /// bdev's channels there).
    pub fn attach(&self, reactor: &ReactorHandle) -> Result<(), ConvertError> {
        let shared = self.shared.clone();
        reactor
            .call(move |r| -> Result<(), ConvertError> {
                let init = shared
                    .init
                    .lock()
                    .map_err(|_| ConvertError::Reactor("poisoned".into()))?
                    .take()
                    .ok_or_else(|| ConvertError::Reactor("already attached".into()))?;
                let ch = shared
                    .target
                    .open_channel(r)
                    .map_err(|e| ConvertError::Target(e.to_string()))?;
                let core = Rc::new(RefCell::new(Core::new(ch, init)));
                CORES.with(|c| c.borrow_mut().insert(shared.uid, core.clone()));
                r.register(Box::new(ConvertPoller {
                    uid: shared.uid,
                    core,
                }));
                Ok(())
            })
            .map_err(|e| ConvertError::Reactor(e.to_string()))?
    }
}

pub mod service;
pub mod tool;
