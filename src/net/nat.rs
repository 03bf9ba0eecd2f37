//! The MAC-NAT decision for one frame: which port it leaves on, whether it was translated, or
//! why it is dropped. Pure over a byte slice, so it is tested without DPDK; the lcore loop in
//! [`super::dataplane`] calls it for every received frame.

use super::ipv4map::{port_tag, Entry, Ipv4BindingMap};
use super::macnat::MacNatVersion;
use super::packet::{self, Control, FrameInfo, Malformed, L3};

/// What to do with frames that MAC-NAT cannot vouch for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Count and drop.
    #[default]
    Drop,
    /// Count and forward untouched.
    Forward,
}

/// Per-deployment policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The uplink (physical NIC) port id.
    pub uplink: u16,
    /// Where ingress broadcast/multicast (and forwarded unknowns) go; `None` drops them.
    pub flood_port: Option<u16>,
    /// Egress frames whose source IP is not in the table.
    pub unknown_ip: Disposition,
    /// Egress frames whose IP is known but whose source MAC (or port) is not the VM's.
    pub spoofed: Disposition,
    /// LLDP/STP/LACP/EAPOL in either direction.
    pub control: Disposition,
}

/// Why a frame was dropped; `as_str` names its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Could not be parsed.
    Malformed(Malformed),
    /// Egress source IP (or no-IP source MAC) not in the table; ingress destination IP unknown.
    UnknownIp,
    /// Egress from a known IP with the wrong source MAC or from the wrong port.
    Spoofed,
    /// Ingress for a known VM IP whose destination MAC is not that VM's global MAC.
    MacMismatch,
    /// Link-local control protocol dropped by policy.
    Control,
    /// Ingress broadcast/multicast with no flood port configured.
    NoFloodPort,
}

impl DropReason {
    /// Counter name.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Malformed(m) => m.as_str(),
            DropReason::UnknownIp => "unknown_ip",
            DropReason::Spoofed => "spoofed",
            DropReason::MacMismatch => "mac_mismatch",
            DropReason::Control => "control",
            DropReason::NoFloodPort => "no_flood_port",
        }
    }
}

/// The decision for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send on `port`; `translated` when MAC-NAT rewrote it.
    Forward {
        /// Output port.
        port: u16,
        /// MAC-NAT applied.
        translated: bool,
    },
    /// Drop and count.
    Drop(DropReason),
}

#[inline(always)]
fn untouched_or(d: Disposition, port: Option<u16>, reason: DropReason) -> Verdict {
    match (d, port) {
        (Disposition::Forward, Some(port)) => Verdict::Forward {
            port,
            translated: false,
        },
        _ => Verdict::Drop(reason),
    }
}

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// Frames a burst call handles at most (the dataplane's rx burst).
pub const BURST: usize = 32;

/// The first 34 bytes of a frame with a plain 20-byte IPv4 header after 14 bytes of Ethernet,
/// the shape nearly all traffic has; `None` sends the frame down the general path. The
/// ethertype is each direction's to check ([`FastPath::takes`] or [`FastPath::apply`]).
#[inline(always)]
fn plain_ipv4(frame: &mut [u8]) -> Option<&mut [u8; 34]> {
    let h = frame.first_chunk_mut::<34>()?;
    // 0x45: version 4, IHL 5. Total length must at least cover the header (else BadIpv4).
    if h[14] != 0x45 || u16::from_be_bytes([h[16], h[17]]) < 20 {
        return None;
    }
    Some(h)
}

/// The IPv4 address at `off` as the MAC-NAT map keys it: its four bytes in frame order, loaded
/// as a native integer (no byte swap on the fast path).
#[inline(always)]
fn map_key_at(h: &[u8; 34], off: usize) -> u32 {
    u32::from_ne_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]])
}

/// The direction-specific part of the IPv4 fast path.
trait FastPath {
    /// Offset of the IPv4 address that is the key (source for egress, destination for ingress).
    const KEY_AT: usize;
    /// Every translated frame goes to the same port (egress: the uplink), so a burst needs no
    /// per-frame output port.
    const ONE_PORT: bool;
    /// `apply` checks the slot's port ([`Entry::on_port`]), which an empty slot never passes,
    /// so key 0 (0.0.0.0, which finds empty slots) needs no test of its own.
    const CHECKS_PORT: bool;
    /// Whether the fast path takes this frame with a plain IPv4 header and this (non-zero) key.
    /// Its ethertype is checked here or in `apply`, before anything is rewritten.
    fn takes(h: &[u8; 34]) -> bool;
    /// Checks and rewrites a frame whose key was found; `None` (frame untouched) sends it to
    /// the general path. `Some(port)` is where the translated frame goes.
    fn apply(&self, h: &mut [u8; 34], e: Entry<'_>) -> Option<u16>;
}

/// Egress from a VM on the port of tag `in_port` ([`port_tag`]) to `uplink`.
struct Egress {
    in_port: u8,
    uplink: u16,
}

impl Egress {
    fn new(in_port: u16, uplink: u16) -> Egress {
        Egress {
            in_port: port_tag(in_port),
            uplink,
        }
    }
}

impl FastPath for Egress {
    const KEY_AT: usize = 26;
    const ONE_PORT: bool = true;
    const CHECKS_PORT: bool = true;
    /// The ethertype is compared in `apply`, with the source MAC.
    #[inline(always)]
    fn takes(_: &[u8; 34]) -> bool {
        true
    }
    #[inline(always)]
    fn apply(&self, h: &mut [u8; 34], e: Entry<'_>) -> Option<u16> {
        // The source MAC and the ethertype, compared and rewritten as one 8-byte word.
        let w = h.get_mut(6..14)?.first_chunk_mut::<8>()?;
        if !e.local_ipv4_matches(*w) || !e.on_port(self.in_port) {
            return None;
        }
        *w = *e.global_ipv4_word();
        Some(self.uplink)
    }
}

/// Ingress from the uplink to the VM's port.
struct Ingress;

impl FastPath for Ingress {
    const KEY_AT: usize = 30;
    const ONE_PORT: bool = false;
    const CHECKS_PORT: bool = false;
    /// IPv4, towards a unicast MAC only: broadcast and multicast are never translated.
    #[inline(always)]
    fn takes(h: &[u8; 34]) -> bool {
        h[12..14] == ETHERTYPE_IPV4 && h[0] & 1 == 0
    }
    #[inline(always)]
    fn apply(&self, h: &mut [u8; 34], e: Entry<'_>) -> Option<u16> {
        if h[0..6] != e.global() {
            return None;
        }
        h[0..6].copy_from_slice(&e.local());
        Some(e.port())
    }
}

/// The fast path for one frame: a plain IPv4 frame whose key is in the table and passes the
/// checks is translated; returns its output port. `None` leaves the frame untouched.
#[inline(always)]
fn fast_one<P: FastPath>(p: &P, frame: &mut [u8], map: &Ipv4BindingMap) -> Option<u16> {
    let (h, key) = fast_key::<P>(frame)?;
    let e = map.find(key, map.home(key))?;
    p.apply(h, e)
}

/// A frame the fast path takes (plain IPv4, the direction's own condition, a non-zero key unless
/// `apply` checks the port): its first 34 bytes and its key.
#[inline(always)]
fn fast_key<P: FastPath>(frame: &mut [u8]) -> Option<(&mut [u8; 34], u32)> {
    let h = plain_ipv4(frame)?;
    let key = map_key_at(h, P::KEY_AT);
    ((P::CHECKS_PORT || key != 0) && P::takes(h)).then_some((h, key))
}

/// A burst's lookups started ahead of its processing: each frame's key (0: not for the fast
/// path) and home bucket, the buckets already being loaded into cache. Only tables that do not
/// fit in cache gain from it; for others [`Prefetched::start`] does nothing.
pub struct Prefetched {
    keys: [u32; BURST],
    homes: [usize; BURST],
    active: bool,
}

impl Prefetched {
    /// Nothing started: the burst functions look up as they go.
    pub const NONE: Prefetched = Prefetched {
        keys: [0; BURST],
        homes: [0; BURST],
        active: false,
    };

    /// Starts a burst's lookups (`egress`: frames from a VM; else from the uplink) when the
    /// table is too big for the cache; otherwise leaves nothing started.
    #[inline]
    pub fn start<F: AsMut<[u8]>>(&mut self, frames: &mut [F], egress: bool, table: &MacNatVersion) {
        let map = table.v4_map();
        self.active = !map.cache_resident();
        if self.active {
            if egress {
                self.gather::<Egress, F>(frames, map)
            } else {
                self.gather::<Ingress, F>(frames, map)
            }
        }
    }

    /// Whether lookups were started (the caller may do other work before finishing them).
    pub fn is_active(&self) -> bool {
        self.active
    }

    #[inline(always)]
    fn gather<P: FastPath, F: AsMut<[u8]>>(&mut self, frames: &mut [F], map: &Ipv4BindingMap) {
        for ((k, home), f) in self
            .keys
            .iter_mut()
            .zip(self.homes.iter_mut())
            .zip(frames.iter_mut())
        {
            *k = 0;
            if let Some((_, key)) = fast_key::<P>(f.as_mut()) {
                *home = map.home(key);
                map.prefetch_home(*home);
                *k = key;
            }
        }
    }
}

/// The fast path over a burst (at most [`BURST`] frames). `ports[i]` is where frame `i` goes
/// when it was translated. Returns a mask of the frames it left untouched for the general path:
/// bit `i` for frame `i`.
///
/// Tables that fit in cache are looked up frame by frame. Bigger ones take two passes: the
/// first finds every frame's key and home bucket and prefetches the bucket (or `pre` did that
/// already, for these frames and this table), the second looks up and translates, so the cache
/// misses of a burst overlap (DPDK l3fwd's bulk lookup).
#[inline(always)]
fn fast_burst<P: FastPath, F: AsMut<[u8]>>(
    p: &P,
    frames: &mut [F],
    map: &Ipv4BindingMap,
    pre: &Prefetched,
    ports: &mut [u16; BURST],
) -> u32 {
    let mut other = 0u32;
    if map.cache_resident() {
        for (i, (f, port)) in frames.iter_mut().zip(ports.iter_mut()).enumerate() {
            match fast_one(p, f.as_mut(), map) {
                Some(to) => {
                    if !P::ONE_PORT {
                        *port = to
                    }
                }
                None => other |= 1 << i,
            }
        }
        return other;
    }
    let mut own = Prefetched::NONE;
    let pre = if pre.active {
        pre
    } else {
        own.gather::<P, F>(frames, map);
        &own
    };
    for (i, ((f, (&k, &home)), port)) in frames
        .iter_mut()
        .zip(pre.keys.iter().zip(pre.homes.iter()))
        .zip(ports.iter_mut())
        .enumerate()
    {
        let to = match (k, f.as_mut().first_chunk_mut::<34>()) {
            (0, _) | (_, None) => None,
            (_, Some(h)) => map.find(k, home).and_then(|e| p.apply(h, e)),
        };
        match to {
            Some(to) => {
                if !P::ONE_PORT {
                    *port = to
                }
            }
            None => other |= 1 << i,
        }
    }
    other
}

/// [`egress`] for a burst of frames a VM sent on `in_port`: frame by frame the same decisions
/// and rewrites (a property test checks). Returns the uplink when every frame was translated,
/// so the caller can send the burst as it is, and leaves `verdicts` alone; otherwise
/// `verdicts[i]` is frame `i`'s. More than [`BURST`] frames is a caller bug: the extra frames
/// get no verdict (the dataplane drops them). `pre`: [`Prefetched::NONE`], or lookups started
/// for exactly these frames (egress) on this table version.
#[inline]
pub fn egress_burst<F: AsMut<[u8]>>(
    frames: &mut [F],
    in_port: u16,
    table: &MacNatVersion,
    policy: &Policy,
    pre: &Prefetched,
    verdicts: &mut [Verdict; BURST],
) -> Option<u16> {
    let general = |f: &mut [u8]| egress_general(f, in_port, table, policy);
    if frames.len() > BURST {
        fill_verdicts(frames, u32::MAX, |_| policy.uplink, verdicts, general);
        return None;
    }
    let p = Egress::new(in_port, policy.uplink);
    // Egress is ONE_PORT: every translated frame goes to the uplink; `ports` stays unused.
    let mut ports = [0u16; BURST];
    let other = fast_burst(&p, frames, table.v4_map(), pre, &mut ports);
    if other == 0 {
        return Some(policy.uplink);
    }
    fill_verdicts(frames, other, |_| policy.uplink, verdicts, general);
    None
}

/// [`ingress`] for a burst from the uplink, as [`egress_burst`]: returns the port when every
/// frame was translated towards one VM-side port, else fills `verdicts`.
#[inline]
pub fn ingress_burst<F: AsMut<[u8]>>(
    frames: &mut [F],
    table: &MacNatVersion,
    policy: &Policy,
    pre: &Prefetched,
    verdicts: &mut [Verdict; BURST],
) -> Option<u16> {
    let mut ports = [0u16; BURST];
    let other = fast_burst(&Ingress, frames, table.v4_map(), pre, &mut ports);
    let n = frames.len().min(BURST);
    let first = ports[0];
    if other == 0 && frames.len() <= BURST && n > 0 && ports[..n].iter().all(|p| *p == first) {
        return Some(first);
    }
    fill_verdicts(
        frames,
        other,
        |i| ports[i],
        verdicts,
        |f| ingress_general(f, table, policy),
    );
    None
}

/// Verdicts for a burst the fast path did not finish: translated frame `i` goes to
/// `port_of(i)`, the others (bits of `other`) are decided by `general`.
#[inline(always)]
fn fill_verdicts<F: AsMut<[u8]>>(
    frames: &mut [F],
    other: u32,
    port_of: impl Fn(usize) -> u16,
    verdicts: &mut [Verdict; BURST],
    mut general: impl FnMut(&mut [u8]) -> Verdict,
) {
    for (i, (f, v)) in frames.iter_mut().zip(verdicts.iter_mut()).enumerate() {
        *v = if other & (1 << i) == 0 {
            Verdict::Forward {
                port: port_of(i),
                translated: true,
            }
        } else {
            general(f.as_mut())
        };
    }
}

/// A frame a VM sent on `in_port`: translate its source and send it to the uplink.
#[inline]
pub fn egress(frame: &mut [u8], in_port: u16, table: &MacNatVersion, policy: &Policy) -> Verdict {
    // Fast path: plain IPv4 with a source address, translated. Everything else, including a
    // fast-path miss (unknown, spoofed), is decided by the general path, so the fast path can
    // only ever agree with it (a property test checks the rewrite too).
    let p = Egress::new(in_port, policy.uplink);
    match fast_one(&p, frame, table.v4_map()) {
        Some(port) => Verdict::Forward {
            port,
            translated: true,
        },
        None => egress_general(frame, in_port, table, policy),
    }
}

/// Every frame shape: VLAN/QinQ, ARP, IPv6/ND, control protocols, no-IP sources.
/// Out of line: keeps the burst loop around the fast path small.
#[inline(never)]
fn egress_general(
    frame: &mut [u8],
    in_port: u16,
    table: &MacNatVersion,
    policy: &Policy,
) -> Verdict {
    let info = match packet::parse(frame) {
        Ok(i) => i,
        Err(m) => return Verdict::Drop(DropReason::Malformed(m)),
    };
    if let L3::Control(_) = info.l3 {
        return untouched_or(policy.control, Some(policy.uplink), DropReason::Control);
    }
    let binding = match packet::egress_key(&info) {
        Some(ip) => table.lookup(ip),
        // No source IP yet (DHCP discover from 0.0.0.0, IPv6 DAD from ::, non-IP): the VM is
        // identified by its local MAC.
        None => table.lookup_local_mac(info.src),
    };
    let Some(b) = binding else {
        return untouched_or(
            policy.unknown_ip,
            Some(policy.uplink),
            DropReason::UnknownIp,
        );
    };
    if info.src != b.local || in_port != b.port {
        return untouched_or(policy.spoofed, Some(policy.uplink), DropReason::Spoofed);
    }
    packet::rewrite_egress(frame, &info, b.local, b.global);
    Verdict::Forward {
        port: policy.uplink,
        translated: true,
    }
}

/// A frame from the uplink: translate its destination and deliver it to the VM's port.
#[inline]
pub fn ingress(frame: &mut [u8], table: &MacNatVersion, policy: &Policy) -> Verdict {
    // Fast path: plain IPv4 to a unicast MAC, translated; the rest as in `egress`.
    match fast_one(&Ingress, frame, table.v4_map()) {
        Some(port) => Verdict::Forward {
            port,
            translated: true,
        },
        None => ingress_general(frame, table, policy),
    }
}

/// Out of line: keeps the burst loop around the fast path small.
#[inline(never)]
fn ingress_general(frame: &mut [u8], table: &MacNatVersion, policy: &Policy) -> Verdict {
    let info: FrameInfo = match packet::parse(frame) {
        Ok(i) => i,
        Err(m) => return Verdict::Drop(DropReason::Malformed(m)),
    };
    if let L3::Control(c) = info.l3 {
        let _: Control = c;
        return untouched_or(policy.control, policy.flood_port, DropReason::Control);
    }
    if info.dst.is_multicast() {
        // Never translate broadcast/multicast destinations.
        return match policy.flood_port {
            Some(port) => Verdict::Forward {
                port,
                translated: false,
            },
            None => Verdict::Drop(DropReason::NoFloodPort),
        };
    }
    let Some(b) = packet::ingress_key(&info).and_then(|ip| table.lookup(ip)) else {
        return untouched_or(policy.unknown_ip, policy.flood_port, DropReason::UnknownIp);
    };
    if info.dst != b.global {
        return Verdict::Drop(DropReason::MacMismatch);
    }
    packet::rewrite_ingress(frame, &info, b.global, b.local);
    Verdict::Forward {
        port: b.port,
        translated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frames;
    use crate::net::macnat::MacNatEntry;
    use crate::net::packet::{IpKey, MacAddr};
    use proptest::prelude::*;

    const LOCAL: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    const GLOBAL: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const PEER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);

    fn table() -> MacNatVersion {
        MacNatVersion::from_entries(&[
            MacNatEntry {
                ip: IpKey::V4([10, 0, 0, 2]),
                local: LOCAL,
                global: GLOBAL,
                port: 1,
            },
            MacNatEntry {
                ip: IpKey::V4([10, 0, 0, 3]),
                local: MacAddr([0x52, 0x54, 0, 0, 0, 3]),
                global: GLOBAL,
                port: 2,
            },
        ])
        .unwrap()
    }

    fn policy(d: Disposition) -> Policy {
        Policy {
            uplink: 0,
            flood_port: Some(1),
            unknown_ip: d,
            spoofed: d,
            control: d,
        }
    }

    #[test]
    fn ipv4_egress_and_ingress() {
        let t = table();
        let p = policy(Disposition::Drop);
        let mut f = frames::ipv4_udp(PEER, LOCAL, [10, 0, 0, 2], [10, 0, 0, 1], 60);
        assert_eq!(
            egress(&mut f, 1, &t, &p),
            Verdict::Forward {
                port: 0,
                translated: true
            }
        );
        assert_eq!(
            f,
            frames::ipv4_udp(PEER, GLOBAL, [10, 0, 0, 2], [10, 0, 0, 1], 60)
        );
        let mut f = frames::ipv4_udp(PEER, LOCAL, [10, 0, 0, 2], [10, 0, 0, 1], 60);
        assert_eq!(
            egress(&mut f, 2, &t, &p),
            Verdict::Drop(DropReason::Spoofed),
            "right MAC, wrong port"
        );
        let mut f = frames::ipv4_udp(
            PEER,
            MacAddr([0x52, 0x54, 0, 0, 0, 9]),
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            60,
        );
        assert_eq!(
            egress(&mut f, 1, &t, &p),
            Verdict::Drop(DropReason::Spoofed)
        );
        let mut f = frames::ipv4_udp(PEER, LOCAL, [10, 0, 0, 9], [10, 0, 0, 1], 60);
        assert_eq!(
            egress(&mut f, 1, &t, &p),
            Verdict::Drop(DropReason::UnknownIp)
        );
        assert_eq!(
            egress(&mut f, 1, &t, &policy(Disposition::Forward)),
            Verdict::Forward {
                port: 0,
                translated: false
            }
        );
        let mut f = frames::ipv4_udp(GLOBAL, PEER, [10, 0, 0, 1], [10, 0, 0, 3], 60);
        assert_eq!(
            ingress(&mut f, &t, &p),
            Verdict::Forward {
                port: 2,
                translated: true
            }
        );
        assert_eq!(&f[0..6], &[0x52, 0x54, 0, 0, 0, 3]);
        let mut f = frames::ipv4_udp(PEER, PEER, [10, 0, 0, 1], [10, 0, 0, 3], 60);
        assert_eq!(
            ingress(&mut f, &t, &p),
            Verdict::Drop(DropReason::MacMismatch)
        );
        let mut f = frames::ipv4_udp(MacAddr::BROADCAST, PEER, [10, 0, 0, 1], [10, 0, 0, 3], 60);
        assert_eq!(
            ingress(&mut f, &t, &p),
            Verdict::Forward {
                port: 1,
                translated: false
            },
            "broadcast is flooded untouched"
        );
        assert_eq!(&f[0..6], &[0xff; 6]);
        // DHCP discover from 0.0.0.0: identified by the local MAC.
        let mut f = frames::ipv4_udp(
            MacAddr::BROADCAST,
            LOCAL,
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            300,
        );
        assert_eq!(
            egress(&mut f, 1, &t, &p),
            Verdict::Forward {
                port: 0,
                translated: true
            }
        );
        assert_eq!(&f[6..12], &GLOBAL.0);
    }

    /// 0.0.0.0 finds the empty slots of the IPv4 map (key 0 marks them), and an empty slot's
    /// local MAC and ethertype words are zero. A frame that matches those words is left to the
    /// general path on every input port: egress relies on the slot's port check, which an
    /// empty slot never passes, instead of excluding 0.0.0.0.
    #[test]
    fn zero_source_never_matches_an_empty_slot() {
        let t = table();
        let p = policy(Disposition::Forward);
        let mut f = frames::ipv4_udp(PEER, MacAddr([0; 6]), [0, 0, 0, 0], [10, 0, 0, 1], 60);
        f[12..14].fill(0);
        assert_eq!(f[14], 0x45);
        for port in [0, 1, 2, crate::net::ipv4map::MAX_PORT + 1, u16::MAX] {
            let (mut a, mut b) = (f.clone(), f.clone());
            let v = egress(&mut a, port, &t, &p);
            assert_eq!(v, egress_general(&mut b, port, &t, &p), "port {port}");
            assert!(
                !matches!(
                    v,
                    Verdict::Forward {
                        translated: true,
                        ..
                    }
                ),
                "port {port}: {v:?}"
            );
            assert_eq!(a, f, "port {port}: rewritten");
            let mut burst = [f.clone()];
            let mut verdicts = [Verdict::Drop(DropReason::Control); BURST];
            assert_eq!(
                egress_burst(&mut burst, port, &t, &p, &Prefetched::NONE, &mut verdicts),
                None
            );
            assert_eq!(verdicts[0], v, "port {port}: burst");
        }
    }

    fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
        let ips = prop_oneof![
            Just([10u8, 0, 0, 2]),
            Just([10, 0, 0, 3]),
            Just([10, 0, 0, 9]),
            Just([0, 0, 0, 0]),
            any::<[u8; 4]>()
        ];
        let macs = prop_oneof![
            Just(LOCAL),
            Just(GLOBAL),
            Just(PEER),
            Just(MacAddr::BROADCAST),
            Just(MacAddr([0x52, 0x54, 0, 0, 0, 3])),
            any::<[u8; 6]>().prop_map(MacAddr)
        ];
        let valid = (
            macs.clone(),
            macs,
            ips.clone(),
            ips,
            14usize..200,
            any::<u8>(),
            any::<u16>(),
        )
            .prop_map(|(d, s, sip, dip, len, ver, tl)| {
                let mut f = frames::ipv4_udp(d, s, sip, dip, len);
                // Sometimes break the version/IHL byte or the total length.
                match ver % 4 {
                    0 => f[14] = ver,
                    1 => f[16..18].copy_from_slice(&(tl % 64).to_be_bytes()),
                    _ => {}
                }
                f
            });
        prop_oneof![
            valid.clone(),
            valid
                .prop_flat_map(|f| {
                    let n = f.len();
                    (Just(f), 0..=n)
                })
                .prop_map(|(mut f, cut)| {
                    f.truncate(cut);
                    f
                }),
            proptest::collection::vec(any::<u8>(), 0..80)
        ]
    }

    /// `table()` plus enough other entries that the IPv4 map is not cache-resident (the burst
    /// functions then take their two-pass, prefetching route).
    fn big_table() -> &'static MacNatVersion {
        static T: std::sync::OnceLock<MacNatVersion> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let mut entries: Vec<MacNatEntry> = (0..20_000u32)
                .map(|i| {
                    let b = i.to_be_bytes();
                    MacNatEntry {
                        ip: IpKey::V4([10, 1, b[2], b[3]]),
                        local: MacAddr([0x52, 0x54, 1, 0, b[2], b[3]]),
                        global: GLOBAL,
                        port: 1,
                    }
                })
                .collect();
            entries.extend(table().entries());
            let t = MacNatVersion::from_entries(&entries).unwrap();
            assert!(!t.v4_map().cache_resident());
            t
        })
    }

    /// Frames the fast path translates: egress from the VM at 10.0.0.2 (port 1), ingress to it.
    fn translatable() -> impl Strategy<Value = Vec<u8>> {
        (any::<bool>(), 34usize..200).prop_map(|(out, len)| {
            if out {
                frames::ipv4_udp(PEER, LOCAL, [10, 0, 0, 2], [10, 0, 0, 1], len)
            } else {
                frames::ipv4_udp(GLOBAL, PEER, [10, 0, 0, 1], [10, 0, 0, 2], len)
            }
        })
    }

    /// Input ports: the table's, one it does not use, the largest it could, and one beyond
    /// (egress checks the entry's port instead of excluding 0.0.0.0, which finds empty slots).
    fn ports() -> impl Strategy<Value = u16> {
        use crate::net::ipv4map::MAX_PORT;
        prop_oneof![0u16..3, Just(MAX_PORT), Just(MAX_PORT + 2), Just(u16::MAX)]
    }

    fn burst_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let mixed = prop_oneof![translatable(), frame_strategy()];
        prop_oneof![
            proptest::collection::vec(translatable(), 1..=BURST),
            proptest::collection::vec(mixed, 0..=BURST),
        ]
    }

    /// A burst reported as all translated must be all translated, to that port; otherwise its
    /// verdicts must be the frame-by-frame ones.
    fn burst_result_is(
        all: Option<u16>,
        verdicts: &[Verdict; BURST],
        want: &[Verdict],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        match all {
            Some(out) => {
                let done = Verdict::Forward {
                    port: out,
                    translated: true,
                };
                prop_assert!(
                    want.iter().all(|w| *w == done),
                    "all translated to {}: {:?}",
                    out,
                    want
                );
            }
            None => prop_assert_eq!(&verdicts[..want.len()], want),
        }
        Ok(())
    }

    proptest! {
        /// A burst gets exactly the frame-by-frame decisions and rewrites, with a small table
        /// (one pass) and a big one (prefetch pass first). A burst reported as all translated
        /// must be all translated, to that port.
        #[test]
        fn bursts_agree_with_frame_by_frame(burst in burst_strategy(), port in ports(), fwd in any::<bool>(), big in any::<bool>(), ahead in any::<bool>()) {
            let small = table();
            let t = if big { big_table() } else { &small };
            let p = policy(if fwd { Disposition::Forward } else { Disposition::Drop });
            let mut v = [Verdict::Drop(DropReason::Control); BURST];

            // Lookups started ahead (the dataplane's pipelining) or not.
            let mut pre = Prefetched::NONE;
            let (mut a, mut b) = (burst.clone(), burst.clone());
            if ahead {
                pre.start(&mut a, true, t);
                prop_assert_eq!(pre.is_active(), big);
            }
            let all = egress_burst(&mut a, port, t, &p, &pre, &mut v);
            let want: Vec<Verdict> = b.iter_mut().map(|f| egress(f, port, t, &p)).collect();
            prop_assert_eq!(&a, &b);
            burst_result_is(all, &v, &want)?;

            let (mut a, mut b) = (burst.clone(), burst);
            if ahead {
                pre.start(&mut a, false, t);
            }
            let all = ingress_burst(&mut a, t, &p, &pre, &mut v);
            let want: Vec<Verdict> = b.iter_mut().map(|f| ingress(f, t, &p)).collect();
            prop_assert_eq!(&a, &b);
            burst_result_is(all, &v, &want)?;
        }

        /// The fast paths decide exactly what the general path decides, byte for byte.
        #[test]
        fn fast_paths_agree_with_general_path(f in frame_strategy(), port in ports(), fwd in any::<bool>()) {
            let t = table();
            let p = policy(if fwd { Disposition::Forward } else { Disposition::Drop });
            let (mut a, mut b) = (f.clone(), f.clone());
            prop_assert_eq!(egress(&mut a, port, &t, &p), egress_general(&mut b, port, &t, &p));
            prop_assert_eq!(&a, &b);
            let (mut a, mut b) = (f.clone(), f);
            prop_assert_eq!(ingress(&mut a, &t, &p), ingress_general(&mut b, &t, &p));
            prop_assert_eq!(a, b);
        }
    }
}
