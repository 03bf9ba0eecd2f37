//! The conversion map: one bit per grain, set once the grain's data is durable on the target.
//!
//! On disk (a sidecar file, `<target>.convmap` by default): a 4 KiB header — a magic line then a
//! JSON object naming the source, its format, the grain size and the disk size — followed by the
//! bitmap as little-endian `u64` words (bit `g % 64` of word `g / 64` = grain `g`).
//!
//! Why it is crash-safe without a journal: bits only ever go from 0 to 1, and a bit is written
//! only after the target holds that grain's data durably (the reactor flushes the target first,
//! see the module docs of `convert`). So every byte ever written to the map is a superset of what
//! was there and a subset of what is durable: a torn or partial map write leaves a mix of old and
//! new words, each of which is still true. A lost bit costs a re-copy of that grain, which is only
//! harmful if a VM write had landed in the grain — and VM writes wait until the bit is durable.
//!
//! Writes happen on a helper thread (`pwrite` + `fdatasync`), never on a reactor.

use super::source::SourceFormat;
use super::ConvertError;
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

const MAGIC: &[u8] = b"hostplane conversion map v1\n";
/// Bytes before the bitmap.
pub const HEADER_SIZE: u64 = 4096;

/// What a map file is about; a resumed conversion must match it exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapHeader {
    /// Source image path.
    pub source: String,
    /// Source format.
    pub source_format: SourceFormat,
    /// Bytes per grain.
    pub grain_size: u64,
    /// Disk size in bytes.
    pub size: u64,
}

impl MapHeader {
    /// Number of grains.
    pub fn grains(&self) -> u64 {
        self.size.div_ceil(self.grain_size)
    }
}

/// An in-memory bitmap of grains.
#[derive(Clone, Debug, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    /// `len` zero bits.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    fn from_words(mut words: Vec<u64>, len: u64) -> Bitmap {
        words.resize(len.div_ceil(64) as usize, 0);
        if !len.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        let ones = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Bitmap { words, len, ones }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bits set.
    pub fn ones(&self) -> u64 {
        self.ones
    }

    /// Bit `i` (false beyond the end).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; returns whether it changed.
    #[inline]
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        if *w & m != 0 {
            return false;
        }
        *w |= m;
        self.ones += 1;
        true
    }

    /// Word `i` (64 grains).
    pub fn word(&self, i: u64) -> u64 {
        self.words.get(i as usize).copied().unwrap_or(0)
    }

    /// The first clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize];
            if w == u64::MAX && i.is_multiple_of(64) {
                i += 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }
}

/// Path of the map next to a target file.
pub fn default_map_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".convmap");
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

fn map_err(path: &Path, e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Map(format!("{}: {e}", path.display()))
}

/// Creates a map with every bit clear: written to a temporary file, synced, renamed into place,
/// directory synced — a crash leaves either no map or a complete one.
pub fn create(path: &Path, h: &MapHeader) -> Result<Bitmap, ConvertError> {
    let mut head = MAGIC.to_vec();
    head.extend(serde_json::to_vec(h).map_err(|e| map_err(path, e))?);
    head.push(b'\n');
    if head.len() as u64 > HEADER_SIZE {
        return Err(map_err(path, "source path too long for the map header"));
    }
    head.resize(HEADER_SIZE as usize, 0);
    let bits = Bitmap::new(h.grains());
    let tmp = {
        let mut s = path.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let res = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&head)?;
        f.set_len(HEADER_SIZE + 8 * bits.words.len() as u64)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        map_err(path, e)
    })?;
    Ok(bits)
}

/// Reads a map; its header must equal `expect`.
pub fn load(path: &Path, expect: &MapHeader) -> Result<Bitmap, ConvertError> {
    let mut f = File::open(path).map_err(|e| map_err(path, e))?;
    let mut all = Vec::new();
    f.read_to_end(&mut all).map_err(|e| map_err(path, e))?;
    if all.len() < HEADER_SIZE as usize || !all.starts_with(MAGIC) {
        return Err(map_err(path, "not a conversion map"));
    }
    let json = &all[MAGIC.len()..HEADER_SIZE as usize];
    let end = json.iter().position(|&b| b == b'\n').unwrap_or(json.len());
    let h: MapHeader = serde_json::from_slice(&json[..end]).map_err(|e| map_err(path, e))?;
    if &h != expect {
        return Err(map_err(
            path,
            format!("belongs to another conversion ({h:?}; this one is {expect:?})"),
        ));
    }
    let n = h.grains().div_ceil(64) as usize;
    let body = &all[HEADER_SIZE as usize..];
    if body.len() < 8 * n {
        return Err(map_err(path, "bitmap is truncated"));
    }
    let words = body
        .chunks_exact(8)
        .take(n)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok(Bitmap::from_words(words, h.grains()))
}

/// A command for the map writer.
#[derive(Debug)]
pub enum MapCommand {
    /// Write these words (index, value) then `fdatasync`.
    Persist {
        /// Caller's sequence number.
        seq: u64,
        /// Words to write.
        words: Vec<(u64, u64)>,
    },
    /// The conversion finished: delete the map (and sync the directory).
    Remove,
}

/// The map writer's answer.
#[derive(Debug)]
pub struct MapDone {
    /// The command's sequence number (`u64::MAX` for `Remove`).
    pub seq: u64,
    /// Errno on failure.
    pub result: Result<(), i32>,
}

/// The helper thread that owns the map file.
pub struct MapWriter {
    tx: Option<Sender<MapCommand>>,
    rx: Receiver<MapDone>,
    thread: Option<JoinHandle<()>>,
}

impl MapWriter {
    /// Opens `path` for writing on a new helper thread.
    pub fn start(path: &Path) -> Result<MapWriter, ConvertError> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| map_err(path, e))?;
        let (tx, crx) = crossbeam_channel::unbounded::<MapCommand>();
        let (dtx, rx) = crossbeam_channel::unbounded::<MapDone>();
        let p = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("convert-map".into())
            .spawn(move || {
                for cmd in crx {
                    let done = match cmd {
                        MapCommand::Persist { seq, words } => MapDone {
                            seq,
                            result: persist(&f, words).map_err(|e| {
                                log::error!("convert map {}: {e}", p.display());
                                e.raw_os_error().unwrap_or(libc::EIO)
                            }),
                        },
                        MapCommand::Remove => MapDone {
                            seq: u64::MAX,
                            result: std::fs::remove_file(&p)
                                .and_then(|_| sync_dir(&p))
                                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
                        },
                    };
                    if dtx.send(done).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| map_err(path, e))?;
        Ok(MapWriter {
            tx: Some(tx),
            rx,
            thread: Some(thread),
        })
    }

    /// Queues a command; false if the thread is gone.
    pub fn send(&self, c: MapCommand) -> bool {
        self.tx.as_ref().is_some_and(|t| t.send(c).is_ok())
    }

    /// A finished command, if any.
    pub fn try_done(&self) -> Option<MapDone> {
        self.rx.try_recv().ok()
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn persist(f: &File, mut words: Vec<(u64, u64)>) -> std::io::Result<()> {
    words.sort_unstable_by_key(|w| w.0);
    words.dedup_by_key(|w| w.0);
    let mut i = 0;
    while i < words.len() {
        // One pwrite per run of consecutive words.
        let mut j = i + 1;
        while j < words.len() && words[j].0 == words[j - 1].0 + 1 {
            j += 1;
        }
        let bytes: Vec<u8> = words[i..j].iter().flat_map(|w| w.1.to_le_bytes()).collect();
        f.write_all_at(&bytes, HEADER_SIZE + 8 * words[i].0)?;
        i = j;
    }
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.next_clear(0), Some(0));
        for i in 0..129 {
            assert!(b.set(i));
        }
        assert!(!b.set(3));
        assert!(!b.set(500));
        assert_eq!(b.ones(), 129);
        assert_eq!(b.next_clear(0), Some(129));
        b.set(129);
        assert_eq!(b.next_clear(0), None);
        let c = Bitmap::from_words(vec![u64::MAX, u64::MAX, u64::MAX], 130);
        assert_eq!(c.ones(), 130);
    }

    #[test]
    fn create_persist_load() {
        let d = std::env::temp_dir().join(format!("hp-convert-map-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("t.raw.convmap");
        let h = MapHeader {
            source: "/x/y.qcow2".into(),
            source_format: SourceFormat::Qcow2,
            grain_size: 65536,
            size: 200 * 65536 + 512,
        };
        let mut b = create(&p, &h).unwrap();
        assert_eq!(b.len(), 201);
        b.set(0);
        b.set(64);
        b.set(200);
        let w = MapWriter::start(&p).unwrap();
        assert!(w.send(MapCommand::Persist {
            seq: 7,
            words: vec![(0, b.word(0)), (1, b.word(1)), (3, b.word(3))],
        }));
        let done = loop {
            if let Some(d) = w.try_done() {
                break d;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!((done.seq, done.result), (7, Ok(())));
        let l = load(&p, &h).unwrap();
        assert_eq!(l.ones(), 3);
        assert!(l.get(0) && l.get(64) && l.get(200) && !l.get(1));
        let other = MapHeader {
            grain_size: 4096,
            ..h.clone()
        };
        assert!(load(&p, &other)
            .unwrap_err()
            .to_string()
            .contains("another conversion"));
        assert!(w.send(MapCommand::Remove));
        drop(w);
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
