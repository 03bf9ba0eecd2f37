//! The MAC-NAT decision for one frame: which port it leaves on, whether it was translated, or
//! why it is dropped. Pure over a byte slice, so it is tested without DPDK; the lcore loop in
//! [`super::dataplane`] calls it for every received frame.

use super::macnat::MacNatVersion;
use super::packet::{self, Control, FrameInfo, L3, Malformed};

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
        (Disposition::Forward, Some(port)) => Verdict::Forward { port, translated: false },
        _ => Verdict::Drop(reason),
    }
}

/// A frame a VM sent on `in_port`: translate its source and send it to the uplink.
#[inline]
pub fn egress(frame: &mut [u8], in_port: u16, table: &MacNatVersion, policy: &Policy) -> Verdict {
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
        return untouched_or(policy.unknown_ip, Some(policy.uplink), DropReason::UnknownIp);
    };
    if info.src != b.local || in_port != b.port {
        return untouched_or(policy.spoofed, Some(policy.uplink), DropReason::Spoofed);
    }
    packet::rewrite_egress(frame, &info, b.local, b.global);
    Verdict::Forward { port: policy.uplink, translated: true }
}

/// A frame from the uplink: translate its destination and deliver it to the VM's port.
#[inline]
pub fn ingress(frame: &mut [u8], table: &MacNatVersion, policy: &Policy) -> Verdict {
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
            Some(port) => Verdict::Forward { port, translated: false },
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
    Verdict::Forward { port: b.port, translated: true }
}
