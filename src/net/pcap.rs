//! Minimal classic-pcap (libpcap format) reader and writer, for the embedded default's generated
//! traffic, golden tests and captures. Microsecond and nanosecond magic, both byte orders.

use std::io::{self, Read, Write};
use std::path::Path;

/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// Errors reading a capture.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// I/O.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a classic pcap file.
    #[error("not a pcap file (magic {0:#010x}); pcapng is not supported")]
    BadMagic(u32),
    /// A record header claims more bytes than remain or than the snap length allows.
    #[error("record {index}: length {len} is not plausible")]
    BadRecord {
        /// Record number.
        index: usize,
        /// Its claimed length.
        len: u32,
    },
    /// Not Ethernet.
    #[error("link type {0} is not Ethernet (1)")]
    LinkType(u32),
}

/// One captured frame with its timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Capture time in nanoseconds since the Unix epoch (microsecond files are scaled).
    pub ts_ns: u64,
    /// Length of the frame on the wire (may exceed `data` when the capture was truncated).
    pub orig_len: u32,
    /// Captured bytes.
    pub data: Vec<u8>,
}

/// Reads every frame of a classic pcap file.
pub fn read_frames(path: &Path) -> Result<Vec<Vec<u8>>, PcapError> {
    Ok(read_records(path)?.into_iter().map(|r| r.data).collect())
}

/// Reads every record (timestamp, wire length, bytes) of a classic pcap file.
pub fn read_records(path: &Path) -> Result<Vec<Record>, PcapError> {
    let mut data = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut data)?;
    parse_records(&data)
}

/// Parses classic pcap bytes into frames (captured bytes of each record).
pub fn parse_frames(data: &[u8]) -> Result<Vec<Vec<u8>>, PcapError> {
    Ok(parse_records(data)?.into_iter().map(|r| r.data).collect())
}

/// Parses classic pcap bytes into records.
pub fn parse_records(data: &[u8]) -> Result<Vec<Record>, PcapError> {
    let hdr: [u8; 24] = data
        .get(..24)
        .and_then(|h| h.try_into().ok())
        .ok_or(PcapError::BadMagic(0))?;
    let magic_le = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let (le, nanos) = match magic_le {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        m => return Err(PcapError::BadMagic(m)),
    };
    let rd = |b: &[u8]| -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = rd(&hdr[20..24]) & 0x0fff_ffff;
    if linktype != LINKTYPE_ETHERNET {
        return Err(PcapError::LinkType(linktype));
    }
    let mut records = Vec::new();
    let mut off = 24usize;
    while off < data.len() {
        let rec = data.get(off..off + 16).ok_or(PcapError::BadRecord {
            index: records.len(),
            len: 0,
        })?;
        let incl = rd(&rec[8..12]);
        let start = off + 16;
        let end = start
            .checked_add(incl as usize)
            .filter(|e| *e <= data.len())
            .ok_or(PcapError::BadRecord {
                index: records.len(),
                len: incl,
            })?;
        let frac = u64::from(rd(&rec[4..8]));
        let ts_ns =
            u64::from(rd(&rec[0..4])) * 1_000_000_000 + if nanos { frac } else { frac * 1000 };
        records.push(Record {
            ts_ns,
            orig_len: rd(&rec[12..16]),
            data: data[start..end].to_vec(),
        });
        off = end;
    }
    Ok(records)
}

/// Writes frames to a classic pcap file (microsecond timestamps, 1 ms apart).
pub fn write_frames(path: &Path, frames: &[Vec<u8>]) -> io::Result<()> {
    let mut out = Vec::with_capacity(24 + frames.iter().map(|f| f.len() + 16).sum::<usize>());
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        let ts_usec = (i as u64) * 1000;
        out.extend_from_slice(&((ts_usec / 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((ts_usec % 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    std::fs::File::create(path)?.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let dir = std::env::temp_dir().join(format!("hp-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.pcap");
        let frames = vec![vec![1u8; 60], vec![2u8; 1514], vec![]];
        write_frames(&p, &frames).unwrap();
        assert_eq!(read_frames(&p).unwrap(), frames);
        let records = read_records(&p).unwrap();
        assert_eq!(
            records.iter().map(|r| r.ts_ns).collect::<Vec<_>>(),
            vec![0, 1_000_000, 2_000_000]
        );
        assert_eq!(records[1].orig_len, 1514);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 5);
        assert!(matches!(
            parse_frames(&bytes),
            Err(PcapError::BadRecord { .. })
        ));
        assert!(matches!(
            parse_frames(b"garbage"),
            Err(PcapError::BadMagic(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
