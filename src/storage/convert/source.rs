//! The source image, read on helper threads so a reactor never blocks on it.
//!
//! qcow2 (backing chains, compressed and zero clusters) and flat vmdk are read through the `imago`
//! crate (built with its native `sync` feature: plain blocking calls, no async runtime); raw goes
//! through imago's raw driver too. Sparse vmdk (`monolithicSparse`), which imago 0.2.6 cannot
//! read, goes through our own bounds-checked reader ([`super::vmdk`]). The image is opened
//! read-only and never modified.
//!
//! The reactor sends [`SourceRequest`]s on two queues — VM-triggered copies on the high-priority
//! one, background copies on the low one — served by [`DEFAULT_READERS`] threads (each takes the
//! high queue first), and drains [`SourceReply`]s from its poller: the completion is a message,
//! the reactor never waits.

use super::vmdk::SparseVmdk;
use super::ConvertError;
use crate::storage::bdev::IoBuf;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::vmdk::Vmdk;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate, Storage};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A source image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// Raw bytes.
    Raw,
    /// qcow2 (v2/v3), with backing files, compressed and zero clusters.
    Qcow2,
    /// vmdk: monolithicSparse (what `qemu-img convert -O vmdk` makes, our own reader) or flat
    /// extents (imago).
    Vmdk,
}

impl std::str::FromStr for SourceFormat {
    type Err = ConvertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(SourceFormat::Raw),
            "qcow2" => Ok(SourceFormat::Qcow2),
            "vmdk" => Ok(SourceFormat::Vmdk),
            _ => Err(ConvertError::Source(format!(
                "unknown source format {s:?} (known: raw, qcow2, vmdk)"
            ))),
        }
    }
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
        })
    }
}

/// What the first bytes of a file say it is (a mismatch with the requested format is refused:
/// reading a qcow2 file as raw would silently copy its metadata into the VM's disk).
pub fn sniff(path: &Path) -> std::io::Result<Option<SourceFormat>> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    Ok(if head.starts_with(b"QFI\xfb") {
        Some(SourceFormat::Qcow2)
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some(SourceFormat::Vmdk)
    } else {
        None
    })
}

fn sniff_sparse_vmdk(path: &Path) -> bool {
    let mut m = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut m))
        .is_ok()
        && &m == b"KDMV"
}

/// Data of one read.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes (not all zero).
    Data(IoBuf),
    /// The range reads as zeros (unallocated, a zero cluster, or bytes that happen to be zero):
    /// the target gets a write-zeroes, not a data write.
    Zero,
}

/// A read of `len` bytes at `offset`; `id` comes back in the reply.
#[derive(Debug)]
pub struct SourceRequest {
    /// Caller's identifier.
    pub id: u64,
    /// Byte offset in the image.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// The answer to a [`SourceRequest`].
#[derive(Debug)]
pub struct SourceReply {
    /// The request's `id`.
    pub id: u64,
    /// The data, or an errno.
    pub result: Result<Chunk, i32>,
}

/// A source image opened on its helper thread.
pub struct SourceReader {
    pool: Pool,
    hi: Option<Sender<SourceRequest>>,
    lo: Option<Sender<SourceRequest>>,
    replies: Receiver<SourceReply>,
    thread: Option<JoinHandle<()>>,
    size: u64,
}

/// One reader's view of the image: an imago driver (each reader thread opens its own, so their
/// metadata caches never contend), or the sparse vmdk reader (opened once, shared).
enum Image {
    Imago(FormatAccess<File>),
    SparseVmdk(Arc<SparseVmdk>),
}

fn open_imago(path: &Path, format: SourceFormat) -> std::io::Result<Image> {
    let gate = PermissiveImplicitOpenGate::default();
    Ok(Image::Imago(match format {
        SourceFormat::Raw => FormatAccess::new(Raw::<File>::builder_path(path).open(gate)?),
        SourceFormat::Qcow2 => FormatAccess::new(Qcow2::<File>::builder_path(path).open(gate)?),
        SourceFormat::Vmdk => FormatAccess::new(Vmdk::<File>::builder_path(path).open(gate)?),
    }))
}

impl Image {
    fn size(&self) -> u64 {
        match self {
            Image::Imago(i) => i.size(),
            Image::SparseVmdk(v) => v.size(),
        }
    }

    /// Another reader of the same image for another thread.
    fn reopen(&self, path: &Path, format: SourceFormat) -> std::io::Result<Image> {
        match self {
            Image::Imago(_) => open_imago(path, format),
            Image::SparseVmdk(v) => Ok(Image::SparseVmdk(v.clone())),
        }
    }

    fn validate(&self) -> std::io::Result<()> {
        match self {
            Image::Imago(i) => validate(i),
            // Every table was checked against the file at open.
            Image::SparseVmdk(_) => Ok(()),
        }
    }
}

/// Walks every mapping once: corrupt tables and data beyond the end of a (truncated) file fail
/// here, at start, instead of in the middle of a conversion.
fn validate(img: &FormatAccess<File>) -> std::io::Result<()> {
    let size = img.size();
    let mut off = 0u64;
    while off < size {
        let (m, len) = img.get_mapping(off, size - off)?;
        if len == 0 {
            break;
        }
        if let Mapping::Raw {
            storage, offset, ..
        } = m
        {
            let end = offset.saturating_add(len);
            let have = storage.size()?;
            if end > have {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "image data at {off} maps to {offset}+{len} beyond the end of its file \
                         ({have} bytes): truncated image"
                    ),
                ));
            }
        }
        off += len;
    }
    Ok(())
}

/// qcow2 metadata outside the file (a truncated image) may read back as zeros through the
/// storage layer, which would look like an empty disk: check the L1 table's L2 tables fit in the
/// file. Only the header fields needed for that are read.
fn check_qcow2_tables(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let flen = f.metadata()?.len();
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, m);
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0)?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    let cluster = 1u64 << be32(20).min(30);
    let l1_entries = u64::from(be32(36));
    let l1_off = be64(40);
    if l1_off.saturating_add(l1_entries * 8) > flen || be64(48) >= flen {
        return Err(bad(format!(
            "qcow2 tables beyond the end of the file ({flen} bytes): truncated image"
        )));
    }
    let mut l1 = vec![0u8; (l1_entries * 8) as usize];
    f.read_exact_at(&mut l1, l1_off)?;
    for e in l1.chunks_exact(8) {
        let l2 = u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 && l2.saturating_add(cluster) > flen {
            return Err(bad(format!(
                "qcow2 L2 table at {l2} is beyond the end of the file ({flen} bytes): truncated image"
            )));
        }
    }
    Ok(())
}

/// Whether the whole range maps to zeros (no data to read).
fn maps_to_zero(img: &FormatAccess<File>, offset: u64, len: u64) -> std::io::Result<bool> {
    let mut off = offset;
    let end = offset + len;
    while off < end {
        let (m, l) = img.get_mapping(off, end - off)?;
        match m {
            Mapping::Zero { .. } | Mapping::Eof { .. } => {}
            _ => return Ok(false),
        }
        if l == 0 {
            break;
        }
        off += l;
    }
    Ok(true)
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middle bytes.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

fn read_chunk(img: &Image, pool: &Pool, offset: u64, len: u64) -> std::io::Result<Chunk> {
    let size = img.size();
    if offset >= size {
        return Ok(Chunk::Zero);
    }
    let n = len.min(size - offset);
    let zero = match img {
        Image::Imago(i) => maps_to_zero(i, offset, n)?,
        Image::SparseVmdk(v) => v.maps_to_zero(offset, n),
    };
    if zero {
        return Ok(Chunk::Zero);
    }
    let mut buf = pool.get(len as usize);
    let (dst, tail) = buf.as_mut_slice().split_at_mut(n as usize);
    // A recycled buffer holds old data: clear what the image does not cover.
    tail.fill(0);
    let read = match img {
        Image::Imago(i) => i.read(dst, offset),
        Image::SparseVmdk(v) => v.read_at(dst, offset),
    };
    if let Err(e) = read {
        pool.put(buf);
        return Err(e);
    }
    if is_zero(buf.as_slice()) {
        pool.put(buf);
        return Ok(Chunk::Zero);
    }
    Ok(Chunk::Data(buf))
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Source reader threads per conversion by default: qcow2 lookups, the copy out of the page
/// cache and the zero scan are CPU work, and one thread left the target idle (docs/convert.md).
pub const DEFAULT_READERS: usize = 3;

/// Size of the recycled read buffers (a whole background copy, see `core::BG_RUN_BYTES`).
pub const POOL_BUF: usize = 1 << 20;
/// Recycled buffers kept at most (idle memory: this many × [`POOL_BUF`]).
const POOL_MAX: usize = 32;

/// Buffers handed back after their target write, reused by the reader threads: allocating and
/// freeing a fresh 1 MiB buffer per copy cost more CPU (page faults, zeroing, unmapping) than
/// the copy itself.
#[derive(Clone)]
struct Pool {
    tx: Sender<IoBuf>,
    rx: Receiver<IoBuf>,
}

impl Pool {
    fn get(&self, len: usize) -> IoBuf {
        if len == POOL_BUF {
            if let Ok(b) = self.rx.try_recv() {
                return b;
            }
        }
        IoBuf::new(len)
    }
    fn put(&self, b: IoBuf) {
        if b.len() == POOL_BUF {
            let _ = self.tx.try_send(b);
        }
    }
}

impl SourceReader {
    /// Opens `path` as `format` on [`DEFAULT_READERS`] helper threads, checks it, and returns
    /// once it is ready. Errors (unreadable, wrong format, corrupt, truncated) name the file.
    pub fn open(path: &Path, format: SourceFormat) -> Result<SourceReader, ConvertError> {
        Self::open_with(path, format, DEFAULT_READERS)
    }

    /// Like [`SourceReader::open`] with `readers` helper threads (at least 1).
    pub fn open_with(
        path: &Path,
        format: SourceFormat,
        readers: usize,
    ) -> Result<SourceReader, ConvertError> {
        let sniffed =
            sniff(path).map_err(|e| ConvertError::Source(format!("{}: {e}", path.display())))?;
        match (format, sniffed) {
            (f, Some(s)) if f != s => {
                return Err(ConvertError::Source(format!(
                    "{}: is a {s} image, not {f}",
                    path.display()
                )))
            }
            (SourceFormat::Qcow2 | SourceFormat::Vmdk, None) => {
                return Err(ConvertError::Source(format!(
                    "{}: not a {format} image (bad magic)",
                    path.display()
                )))
            }
            _ => {}
        }
        let (hi_tx, hi_rx) = crossbeam_channel::unbounded::<SourceRequest>();
        let (lo_tx, lo_rx) = crossbeam_channel::unbounded::<SourceRequest>();
        let (rep_tx, rep_rx) = crossbeam_channel::unbounded::<SourceReply>();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<u64, String>>(1);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded::<IoBuf>(POOL_MAX);
        let pool = Pool {
            tx: pool_tx,
            rx: pool_rx,
        };
        let pool0 = pool.clone();
        let p: PathBuf = path.to_path_buf();
        let readers = readers.max(1);
        // Reader 0 opens and checks the image, then starts the others (each with its own imago
        // driver; a sparse vmdk is shared) before it reports ready.
        let thread = std::thread::Builder::new()
            .name("convert-src".into())
            .spawn(move || {
                let checked = match format {
                    SourceFormat::Qcow2 => check_qcow2_tables(&p),
                    _ => Ok(()),
                };
                let img = match checked
                    .and_then(|_| {
                        if format == SourceFormat::Vmdk && sniff_sparse_vmdk(&p) {
                            SparseVmdk::open(&p).map(|v| Image::SparseVmdk(Arc::new(v)))
                        } else {
                            open_imago(&p, format)
                        }
                    })
                    .and_then(|i| i.validate().map(|_| i))
                {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{}: {e}", p.display())));
                        return;
                    }
                };
                let mut others = Vec::new();
                for k in 1..readers {
                    let Ok(more) = img.reopen(&p, format) else {
                        break;
                    };
                    let (hi, lo, out) = (hi_rx.clone(), lo_rx.clone(), rep_tx.clone());
                    let pool = pool0.clone();
                    let t = std::thread::Builder::new()
                        .name(format!("convert-src{k}"))
                        .spawn(move || serve(&more, &pool, &hi, &lo, &out));
                    match t {
                        Ok(t) => others.push(t),
                        Err(_) => break,
                    }
                }
                let _ = ready_tx.send(Ok(img.size()));
                serve(&img, &pool0, &hi_rx, &lo_rx, &rep_tx);
                for t in others {
                    let _ = t.join();
                }
            })
            .map_err(|e| ConvertError::Source(format!("helper thread: {e}")))?;
        let size = match ready_rx.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(ConvertError::Source(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ConvertError::Source(format!(
                    "{}: reader thread died while opening",
                    path.display()
                )));
            }
        };
        Ok(SourceReader {
            pool,
            hi: Some(hi_tx),
            lo: Some(lo_tx),
            replies: rep_rx,
            thread: Some(thread),
            size,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Queues a read; `urgent` (a VM request waits for it) goes ahead of background reads.
    /// Returns false if the helper thread is gone.
    pub fn request(&self, req: SourceRequest, urgent: bool) -> bool {
        let q = if urgent { &self.hi } else { &self.lo };
        q.as_ref().is_some_and(|q| q.send(req).is_ok())
    }

    /// Hands a buffer back for reuse once the target is done with it.
    pub fn recycle(&self, buf: IoBuf) {
        self.pool.put(buf);
    }

    /// A finished read, if any (never blocks).
    pub fn try_reply(&self) -> Option<SourceReply> {
        self.replies.try_recv().ok()
    }
}

impl Drop for SourceReader {
    fn drop(&mut self) {
        // Closing both queues ends the helper threads after their current reads.
        self.hi.take();
        self.lo.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    img: &Image,
    pool: &Pool,
    hi: &Receiver<SourceRequest>,
    lo: &Receiver<SourceRequest>,
    out: &Sender<SourceReply>,
) {
    loop {
        // VM-triggered reads first, then background ones; block only when both are empty.
        let req = match hi.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => match lo.try_recv() {
                Ok(r) => r,
                Err(_) => {
                    crossbeam_channel::select! {
                        recv(hi) -> r => match r { Ok(r) => r, Err(_) => return },
                        recv(lo) -> r => match r { Ok(r) => r, Err(_) => return },
                    }
                }
            },
        };
        let result = read_chunk(img, pool, req.offset, req.len).map_err(|e| {
            log::warn!("convert: source read {}+{}: {e}", req.offset, req.len);
            errno(&e)
        });
        if out.send(SourceReply { id: req.id, result }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn raw_source_reads_and_refuses_wrong_formats() {
        let d = std::env::temp_dir().join(format!("hp-convert-src-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("a.raw");
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate().skip(65536).take(65536) {
            *b = (i % 251) as u8 + 1;
        }
        std::fs::write(&p, &data).unwrap();
        let r = SourceReader::open(&p, SourceFormat::Raw).unwrap();
        assert_eq!(r.size(), 1 << 20);
        assert!(r.request(
            SourceRequest {
                id: 1,
                offset: 0,
                len: 65536
            },
            false
        ));
        assert!(r.request(
            SourceRequest {
                id: 2,
                offset: 65536,
                len: 65536
            },
            true
        ));
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(x) = r.try_reply() {
                got.push(x);
            }
        }
        got.sort_by_key(|x| x.id);
        assert!(matches!(got[0].result, Ok(Chunk::Zero)));
        match &got[1].result {
            Ok(Chunk::Data(b)) => assert_eq!(b.as_slice(), &data[65536..131072]),
            o => panic!("{o:?}"),
        }
        let e = SourceReader::open(&p, SourceFormat::Qcow2).err().unwrap();
        assert!(e.to_string().contains("bad magic"), "{e}");
        std::fs::write(d.join("q"), b"QFI\xfb\0\0\0\x03garbage").unwrap();
        let e = SourceReader::open(&d.join("q"), SourceFormat::Raw)
            .err()
            .unwrap();
        assert!(e.to_string().contains("is a qcow2 image"), "{e}");
        let e = SourceReader::open(&d.join("q"), SourceFormat::Qcow2)
            .err()
            .unwrap();
        assert!(e.to_string().contains(d.join("q").to_str().unwrap()), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
