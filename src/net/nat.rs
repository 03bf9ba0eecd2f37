//! The MAC-NAT decision for one frame: which port it leaves on, whether it was translated, or
//! why it is dropped. Pure over a byte slice, so it is tested without DPDK; the lcore loop in
//! [`super::dataplane`] calls it for every received frame.

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

/// The IPv4 source address (host order) of an untagged IPv4 frame with a plain 20-byte header,
/// the shape nearly all traffic has; `None` sends the frame down the general path.
#[inline(always)]
fn plain_ipv4(frame: &[u8]) -> Option<&[u8; 34]> {
    let h: &[u8; 34] = frame.get(..34)?.try_into().ok()?;
    // 0x45: version 4, IHL 5. Total length must at least cover the header (else BadIpv4).
    if h[12..14] != ETHERTYPE_IPV4 || h[14] != 0x45 || u16::from_be_bytes([h[16], h[17]]) < 20 {
        return None;
    }
    Some(h)
}

#[inline(always)]
fn ipv4_at(h: &[u8; 34], off: usize) -> u32 {
    u32::from_be_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]])
}

/// Prefetches the table line [`egress`] will read for this frame (call for a whole burst first).
#[inline(always)]
pub fn prefetch_egress(frame: &[u8], table: &MacNatVersion) {
    if let Some(h) = plain_ipv4(frame) {
        table.prefetch_v4(ipv4_at(h, 26));
    }
}

/// Prefetches the table line [`ingress`] will read for this frame.
#[inline(always)]
pub fn prefetch_ingress(frame: &[u8], table: &MacNatVersion) {
    if let Some(h) = plain_ipv4(frame) {
        table.prefetch_v4(ipv4_at(h, 30));
    }
}

/// A frame a VM sent on `in_port`: translate its source and send it to the uplink.
#[inline]
pub fn egress(frame: &mut [u8], in_port: u16, table: &MacNatVersion, policy: &Policy) -> Verdict {
    // Fast path: plain IPv4 with a source address. Same decisions as the general path (a
    // property test checks they agree), without building a FrameInfo.
    if let Some(h) = plain_ipv4(frame) {
        let src_ip = ipv4_at(h, 26);
        if src_ip != 0 {
            let Some(b) = table.lookup_v4(src_ip) else {
                return untouched_or(
                    policy.unknown_ip,
                    Some(policy.uplink),
                    DropReason::UnknownIp,
                );
            };
            if h[6..12] != b.local.0 || in_port != b.port {
                return untouched_or(policy.spoofed, Some(policy.uplink), DropReason::Spoofed);
            }
            frame[6..12].copy_from_slice(&b.global.0);
            return Verdict::Forward {
                port: policy.uplink,
                translated: true,
            };
        }
    }
    egress_general(frame, in_port, table, policy)
}

/// Every frame shape: VLAN/QinQ, ARP, IPv6/ND, control protocols, no-IP sources.
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
    // Fast path: plain IPv4 to a unicast MAC (same decisions as the general path).
    if let Some(h) = plain_ipv4(frame) {
        if h[0] & 1 == 0 {
            let Some(b) = table.lookup_v4(ipv4_at(h, 30)) else {
                return untouched_or(policy.unknown_ip, policy.flood_port, DropReason::UnknownIp);
            };
            if h[0..6] != b.global.0 {
                return Verdict::Drop(DropReason::MacMismatch);
            }
            frame[0..6].copy_from_slice(&b.local.0);
            return Verdict::Forward {
                port: b.port,
                translated: true,
            };
        }
    }
    ingress_general(frame, table, policy)
}

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

    proptest! {
        /// The fast paths decide exactly what the general path decides, byte for byte.
        #[test]
        fn fast_paths_agree_with_general_path(f in frame_strategy(), port in 0u16..3, fwd in any::<bool>()) {
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
