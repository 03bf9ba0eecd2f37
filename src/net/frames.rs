//! Builders for well-formed frames: the embedded default's generated traffic, the benchmark's
//! frame template and the integration tests' inputs.

use super::packet::MacAddr;

/// Ethernet header + payload.
fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Internet checksum (RFC 1071) over `data`, starting from `sum`.
pub fn inet_checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (checksummed) + payload.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut h = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ];
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = inet_checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// UDP header (checksum 0 = none, valid for IPv4) + payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// Ethernet/IPv4/UDP frame padded to at least `min_len` bytes (60 = minimum without FCS).
pub fn ipv4_udp(dst: MacAddr, src: MacAddr, sip: [u8; 4], dip: [u8; 4], min_len: usize) -> Vec<u8> {
    let base = 14 + 20 + 8;
    let pad = min_len.saturating_sub(base);
    let payload: Vec<u8> = (0..pad).map(|i| i as u8).collect();
    eth(
        dst,
        src,
        0x0800,
        &ipv4(sip, dip, 17, &udp(4000, 5000, &payload)),
    )
}

/// Ethernet/ARP (Ethernet/IPv4) frame, padded to 60 bytes.
pub fn arp(
    dst: MacAddr,
    src: MacAddr,
    op: u16,
    sha: MacAddr,
    spa: [u8; 4],
    tha: MacAddr,
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&tha.0);
    a.extend_from_slice(&tpa);
    a.resize(46, 0);
    eth(dst, src, 0x0806, &a)
}
