//! Frame parsing and in-place MAC-NAT rewriting: the pure, DPDK-free part of the net fast path.
//!
//! A VM talks to the outside world through a host that owns a *global* MAC; the VM keeps its own
//! *local* MAC. The MAC-NAT table (elsewhere) maps a VM IP to `(local, global)`. This module
//! [`parse`]s a frame once, recording byte offsets so the rewrites never re-parse, hands out the
//! lookup key ([`egress_key`], [`ingress_key`]) and rewrites the frame in place
//! ([`rewrite_egress`], [`rewrite_ingress`]). Nothing here allocates or panics on input: every
//! read is bounds-checked, so any byte slice (including a `FrameInfo` that does not belong to the
//! frame) is safe to hand in.
//!
//! The translation rules and the decisions behind them are in `docs/macnat-frames.md`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// How many VLAN tags (802.1Q, 802.1ad, or the pre-standard 0x9100) [`parse`] walks through.
/// QinQ needs two; a third tag is rare enough that treating it as malformed is cheaper than
/// guessing what a switch upstream would do with it.
pub const MAX_VLAN_TAGS: u8 = 2;

/// How many IPv6 Hop-by-Hop / Destination Options headers [`parse`] walks to find ICMPv6. MLD and
/// some ND implementations put one Hop-by-Hop header first; more than two is never legitimate ND.
pub const MAX_IPV6_EXT_HEADERS: usize = 2;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const ETHERTYPE_QINQ_LEGACY: u16 = 0x9100;
pub const ETHERTYPE_LLDP: u16 = 0x88cc;
pub const ETHERTYPE_SLOW_PROTOCOLS: u16 = 0x8809;
pub const ETHERTYPE_EAPOL: u16 = 0x888e;
/// Type/length values up to this are an 802.3 length followed by an LLC header.
const MAX_8023_LENGTH: u16 = 1500;

pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_LEN: usize = 28;
const ARP_SHA_OFF: usize = 8;
const ARP_SPA_OFF: usize = 14;
const ARP_THA_OFF: usize = 18;
const ARP_TPA_OFF: usize = 24;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;
const ND_OPT_SOURCE_LLA: u8 = 1;
const ND_OPT_TARGET_LLA: u8 = 2;
/// ND option lengths count 8-byte units (RFC 4861 4.6).
const ND_OPT_UNIT: usize = 8;
/// The link-layer address sits after the option's type and length bytes.
const ND_OPT_LLA_OFF: usize = 2;
const ICMPV6_CHECKSUM_OFF: usize = 2;

const ETH_DST_OFF: usize = 0;
const ETH_SRC_OFF: usize = 6;
const ETH_TYPE_OFF: usize = 12;
const VLAN_TAG_LEN: usize = 4;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

/// Spanning tree BPDUs go to this group address with LLC DSAP 0x42.
const STP_GROUP: MacAddr = MacAddr([0x01, 0x80, 0xc2, 0x00, 0x00, 0x00]);
const LLC_SAP_STP: u8 = 0x42;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const ZERO: MacAddr = MacAddr([0; 6]);
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    #[inline]
    pub const fn is_broadcast(&self) -> bool {
        matches!(self.0, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
    }

    /// True for group addresses (the I/G bit), which includes broadcast.
    #[inline]
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("invalid MAC address, expected six colon-separated hex pairs like 02:00:5e:10:00:01")]
pub struct ParseMacAddrError;

impl FromStr for MacAddr {
    type Err = ParseMacAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut pairs = text.split(':');
        for byte in &mut bytes {
            let pair = pairs.next().ok_or(ParseMacAddrError)?;
            // from_str_radix alone would accept "+f"; insist on exactly two hex digits.
            if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseMacAddrError);
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| ParseMacAddrError)?;
        }
        if pairs.next().is_some() {
            return Err(ParseMacAddrError);
        }
        Ok(MacAddr(bytes))
    }
}

/// The MAC-NAT table key: a VM's IP address as it appears on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum IpKey {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl From<IpAddr> for IpKey {
    #[inline]
    fn from(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => IpKey::V4(v4.octets()),
            IpAddr::V6(v6) => IpKey::V6(v6.octets()),
        }
    }
}

impl From<Ipv4Addr> for IpKey {
    #[inline]
    fn from(addr: Ipv4Addr) -> Self {
        IpKey::V4(addr.octets())
    }
}

impl From<Ipv6Addr> for IpKey {
    #[inline]
    fn from(addr: Ipv6Addr) -> Self {
        IpKey::V6(addr.octets())
    }
}

impl From<IpKey> for IpAddr {
    #[inline]
    fn from(key: IpKey) -> Self {
        match key {
            IpKey::V4(octets) => IpAddr::V4(Ipv4Addr::from(octets)),
            IpKey::V6(octets) => IpAddr::V6(Ipv6Addr::from(octets)),
        }
    }
}

impl fmt::Display for IpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        IpAddr::from(*self).fmt(f)
    }
}

/// Why [`parse`] rejected a frame. The caller drops the frame and bumps the counter named by
/// [`Malformed::as_str`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum Malformed {
    /// The frame ends before a header the parser needs (Ethernet, tag, ARP, IPv4/IPv6 header, or
    /// an ND message shorter on the wire than its IPv6 payload length says).
    #[error("frame truncated")]
    Truncated,
    /// More than [`MAX_VLAN_TAGS`] VLAN tags.
    #[error("more than {} VLAN tags", MAX_VLAN_TAGS)]
    TooManyTags,
    /// ARP that is not Ethernet/IPv4 (htype 1, ptype 0x0800, hlen 6, plen 4).
    #[error("ARP is not Ethernet/IPv4")]
    BadArp,
    /// IPv4 version is not 4, IHL < 5, or total length shorter than the header.
    #[error("malformed IPv4 header")]
    BadIpv4,
    /// IPv6 version is not 6, or extension headers longer than the payload length.
    #[error("malformed IPv6 header")]
    BadIpv6,
    /// ND message (RS, RA, NS, NA, Redirect) shorter than its fixed fields.
    #[error("ND message shorter than its fixed fields")]
    BadNd,
    /// ND option with length 0, running past the message, or a second source/target link-layer
    /// address option (which the rewrite would otherwise leave untranslated).
    #[error("malformed ND option")]
    BadNdOption,
}

impl Malformed {
    pub const ALL: [Malformed; 7] = [
        Malformed::Truncated,
        Malformed::TooManyTags,
        Malformed::BadArp,
        Malformed::BadIpv4,
        Malformed::BadIpv6,
        Malformed::BadNd,
        Malformed::BadNdOption,
    ];

    /// Stable snake_case name for counters and metrics labels.
    #[inline]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Malformed::Truncated => "truncated",
            Malformed::TooManyTags => "too_many_tags",
            Malformed::BadArp => "bad_arp",
            Malformed::BadIpv4 => "bad_ipv4",
            Malformed::BadIpv6 => "bad_ipv6",
            Malformed::BadNd => "bad_nd",
            Malformed::BadNdOption => "bad_nd_option",
        }
    }
}

/// Link-local control protocols. They are addressed to the host's port, not to a VM, so neither
/// rewrite translates them; the caller punts or drops them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Control {
    /// LLDP, EtherType 0x88cc.
    Lldp,
    /// Spanning tree BPDU: 802.3/LLC (DSAP 0x42) to 01:80:c2:00:00:00.
    Stp,
    /// Slow protocols, EtherType 0x8809: LACP, and also LACP marker and 802.3ah OAM.
    Lacp,
    /// 802.1X EAPOL, EtherType 0x888e.
    Eapol,
}

impl Control {
    pub const ALL: [Control; 4] = [Control::Lldp, Control::Stp, Control::Lacp, Control::Eapol];

    /// Stable snake_case name for counters and metrics labels.
    #[inline]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Control::Lldp => "lldp",
            Control::Stp => "stp",
            Control::Lacp => "lacp",
            Control::Eapol => "eapol",
        }
    }
}

/// What parsing found, with byte offsets (from the start of the frame) so rewrites don't re-parse.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameInfo {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// VLAN tags walked through (0..=[`MAX_VLAN_TAGS`]); they are never modified.
    pub vlan_tags: u8,
    /// The EtherType after the tags, or the 802.3 length for LLC frames.
    pub ethertype: u16,
    /// Offset of the first byte after the EtherType.
    pub l3_off: usize,
    pub l3: L3,
}

/// The layer-3 content of a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum L3 {
    /// Only the header is required to be in the slice: the payload may live in further mbuf
    /// segments (or a GSO super-frame), and Ethernet padding may follow it.
    Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        /// Offset of the first byte after the IPv4 header (options included).
        l4_off: usize,
    },
    /// Ethernet/IPv4 ARP; anything else is [`Malformed::BadArp`].
    Arp {
        op: u16,
        spa: [u8; 4],
        tpa: [u8; 4],
        /// Offset of the 6-byte sender hardware address.
        sha_off: usize,
        /// Offset of the 6-byte target hardware address.
        tha_off: usize,
    },
    Ipv6 {
        src: [u8; 16],
        dst: [u8; 16],
        /// Upper-layer protocol after up to [`MAX_IPV6_EXT_HEADERS`] Hop-by-Hop/Destination
        /// Options headers. If the walk stopped at another extension header (Routing, Fragment,
        /// ...), this is that header's number and nothing below it is looked at.
        protocol: u8,
        /// Offset of the header named by `protocol`.
        l4_off: usize,
        /// Bytes from `l4_off` to the end of the IPv6 payload, per the payload length field (0
        /// for jumbograms). May exceed the slice except for ND, which must be complete.
        l4_len: usize,
        nd: Option<Nd>,
    },
    Control(Control),
    /// 802.3/LLC frame other than STP (CDP, IPX, ...).
    Llc {
        dsap: u8,
        ssap: u8,
    },
    Other {
        ethertype: u16,
    },
}

/// An ICMPv6 Neighbor Discovery message (RS, RA, NS, NA or Redirect) that fits in the slice.
/// Its ICMPv6 message is `l4_off..l4_off + l4_len` of the enclosing [`L3::Ipv6`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Nd {
    /// 133 RS, 134 RA, 135 NS, 136 NA, 137 Redirect.
    pub icmp_type: u8,
    /// Target address of NS and NA (and Redirect's target); None for RS and RA.
    pub target: Option<[u8; 16]>,
    /// Offset of the 6-byte address inside the source link-layer address option, if present.
    pub slla_off: Option<usize>,
    /// Offset of the 6-byte address inside the target link-layer address option, if present.
    pub tlla_off: Option<usize>,
}

/// Why [`rewrite_egress`] left a frame untouched. The caller drops it and counts it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum EgressRefused {
    /// The Ethernet source is not the VM's local MAC that the table entry says it must be.
    #[error("source MAC is not the VM's local MAC")]
    SpoofedSource,
    /// Link-local control frames from a VM would speak for the host's port; they are never
    /// translated.
    #[error("link-local control frame ({})", .0.as_str())]
    LinkLocalControl(Control),
}

impl EgressRefused {
    /// Stable snake_case name for counters and metrics labels.
    #[inline]
    pub const fn as_str(&self) -> &'static str {
        match self {
            EgressRefused::SpoofedSource => "spoofed_source",
            EgressRefused::LinkLocalControl(_) => "link_local_control",
        }
    }
}

/// `len` bytes at `off`, or None if they are not all in `frame` (offset overflow included).
#[inline]
fn window(frame: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    frame.get(off..off.checked_add(len)?)
}

#[inline]
fn array_at<const N: usize>(frame: &[u8], off: usize) -> Result<[u8; N], Malformed> {
    window(frame, off, N)
        .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
        .ok_or(Malformed::Truncated)
}

#[inline]
fn u16_at(frame: &[u8], off: usize) -> Result<u16, Malformed> {
    array_at::<2>(frame, off).map(u16::from_be_bytes)
}

#[inline]
fn u8_at(frame: &[u8], off: usize) -> Result<u8, Malformed> {
    frame.get(off).copied().ok_or(Malformed::Truncated)
}

#[inline]
fn is_vlan_tpid(ethertype: u16) -> bool {
    matches!(
        ethertype,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_LEGACY
    )
}

/// Parse a frame: Ethernet, up to [`MAX_VLAN_TAGS`] tags, then IPv4, ARP, IPv6 (+ND), link-local
/// control protocols, LLC, or anything else as [`L3::Other`]. Does not allocate.
#[inline]
pub fn parse(frame: &[u8]) -> Result<FrameInfo, Malformed> {
    let dst = MacAddr(array_at(frame, ETH_DST_OFF)?);
    let src = MacAddr(array_at(frame, ETH_SRC_OFF)?);
    let mut type_off = ETH_TYPE_OFF;
    let mut ethertype = u16_at(frame, type_off)?;
    let mut vlan_tags = 0u8;
    while is_vlan_tpid(ethertype) {
        if vlan_tags == MAX_VLAN_TAGS {
            return Err(Malformed::TooManyTags);
        }
        vlan_tags += 1;
        type_off += VLAN_TAG_LEN;
        ethertype = u16_at(frame, type_off)?;
    }
    let l3_off = type_off + 2;
    let l3 = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(frame, l3_off)?,
        ETHERTYPE_ARP => parse_arp(frame, l3_off)?,
        ETHERTYPE_IPV6 => parse_ipv6(frame, l3_off)?,
        ETHERTYPE_LLDP => L3::Control(Control::Lldp),
        ETHERTYPE_SLOW_PROTOCOLS => L3::Control(Control::Lacp),
        ETHERTYPE_EAPOL => L3::Control(Control::Eapol),
        length if length <= MAX_8023_LENGTH => parse_llc(frame, l3_off, dst)?,
        other => L3::Other { ethertype: other },
    };
    Ok(FrameInfo {
        dst,
        src,
        vlan_tags,
        ethertype,
        l3_off,
        l3,
    })
}

#[inline]
fn parse_ipv4(frame: &[u8], l3_off: usize) -> Result<L3, Malformed> {
    let header: [u8; IPV4_MIN_HEADER_LEN] = array_at(frame, l3_off)?;
    if header[0] >> 4 != 4 {
        return Err(Malformed::BadIpv4);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER_LEN {
        return Err(Malformed::BadIpv4);
    }
    // Total length may be less than the slice (Ethernet padding) or more (payload in further
    // segments); only a total length that cannot even hold the header is wrong.
    let total_len = u16::from_be_bytes([header[2], header[3]]);
    if usize::from(total_len) < header_len {
        return Err(Malformed::BadIpv4);
    }
    // Options must be present too: the key is in the fixed part, but l4_off must be real.
    let l4_off = l3_off + header_len;
    if frame.len() < l4_off {
        return Err(Malformed::Truncated);
    }
    Ok(L3::Ipv4 {
        src: [header[12], header[13], header[14], header[15]],
        dst: [header[16], header[17], header[18], header[19]],
        protocol: header[9],
        l4_off,
    })
}

fn parse_arp(frame: &[u8], l3_off: usize) -> Result<L3, Malformed> {
    // Check the shape before the length, so an oversized hlen is reported as BadArp rather than
    // Truncated: it is the shape that is wrong.
    let shape: [u8; 8] = array_at(frame, l3_off)?;
    let htype = u16::from_be_bytes([shape[0], shape[1]]);
    let ptype = u16::from_be_bytes([shape[2], shape[3]]);
    let (hlen, plen) = (shape[4], shape[5]);
    if htype != ARP_HTYPE_ETHERNET || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
        return Err(Malformed::BadArp);
    }
    // Trailing Ethernet padding after the 28 bytes is fine; fewer than 28 is not.
    if frame.len() < l3_off + ARP_LEN {
        return Err(Malformed::Truncated);
    }
    Ok(L3::Arp {
        op: u16::from_be_bytes([shape[6], shape[7]]),
        spa: array_at(frame, l3_off + ARP_SPA_OFF)?,
        tpa: array_at(frame, l3_off + ARP_TPA_OFF)?,
        sha_off: l3_off + ARP_SHA_OFF,
        tha_off: l3_off + ARP_THA_OFF,
    })
}

fn parse_ipv6(frame: &[u8], l3_off: usize) -> Result<L3, Malformed> {
    let header: [u8; IPV6_HEADER_LEN] = array_at(frame, l3_off)?;
    if header[0] >> 4 != 6 {
        return Err(Malformed::BadIpv6);
    }
    let mut l4_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut protocol = header[6];
    let mut l4_off = l3_off + IPV6_HEADER_LEN;
    // Payload length 0 means a jumbogram (length in a Hop-by-Hop option); ND is never one, so
    // there is nothing below worth walking to.
    if l4_len != 0 {
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            if protocol != IPPROTO_HOPOPTS && protocol != IPPROTO_DSTOPTS {
                break;
            }
            let [next_header, len_units] = array_at::<2>(frame, l4_off)?;
            let ext_len = (usize::from(len_units) + 1) * 8;
            l4_len = l4_len.checked_sub(ext_len).ok_or(Malformed::BadIpv6)?;
            l4_off += ext_len;
            protocol = next_header;
        }
    }
    let nd = if protocol == IPPROTO_ICMPV6 {
        parse_nd(frame, l4_off, l4_len)?
    } else {
        None
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    dst.copy_from_slice(&header[24..40]);
    Ok(L3::Ipv6 {
        src,
        dst,
        protocol,
        l4_off,
        l4_len,
        nd,
    })
}

/// Parse an ICMPv6 message as ND, or None if it is another ICMPv6 type.
fn parse_nd(frame: &[u8], icmp_off: usize, icmp_len: usize) -> Result<Option<Nd>, Malformed> {
    if icmp_len == 0 {
        return Ok(None);
    }
    let icmp_type = u8_at(frame, icmp_off)?;
    // Fixed part (ICMPv6 header included) before the options, and whether a target follows the
    // 4 reserved/flag bytes (RFC 4861 sections 4.1-4.5).
    let (fixed_len, has_target) = match icmp_type {
        ND_ROUTER_SOLICIT => (8, false),
        ND_ROUTER_ADVERT => (16, false),
        ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT => (24, true),
        ND_REDIRECT => (40, true),
        _ => return Ok(None),
    };
    if icmp_len < fixed_len {
        return Err(Malformed::BadNd);
    }
    // The whole message must be here: a rewrite updates its checksum.
    let message = window(frame, icmp_off, icmp_len).ok_or(Malformed::Truncated)?;
    let target = if has_target {
        Some(array_at::<16>(message, 8)?)
    } else {
        None
    };
    let mut slla_off = None;
    let mut tlla_off = None;
    let mut opt_off = fixed_len;
    while opt_off < message.len() {
        let [opt_type, len_units] =
            array_at::<2>(message, opt_off).map_err(|_| Malformed::BadNdOption)?;
        let opt_len = usize::from(len_units) * ND_OPT_UNIT;
        // Length 0 would loop forever; RFC 4861 4.6 says discard the packet.
        if opt_len == 0 || opt_len > message.len() - opt_off {
            return Err(Malformed::BadNdOption);
        }
        let lla_slot = match opt_type {
            ND_OPT_SOURCE_LLA => Some(&mut slla_off),
            ND_OPT_TARGET_LLA => Some(&mut tlla_off),
            _ => None,
        };
        if let Some(slot) = lla_slot {
            // A second address option would slip past the rewrite and leak the local MAC.
            if slot.is_some() {
                return Err(Malformed::BadNdOption);
            }
            // opt_len >= 8 holds type, length and the 6-byte address.
            *slot = Some(icmp_off + opt_off + ND_OPT_LLA_OFF);
        }
        opt_off += opt_len;
    }
    Ok(Some(Nd {
        icmp_type,
        target,
        slla_off,
        tlla_off,
    }))
}

/// LLC frames: STP BPDUs are a control protocol; everything else is plain LLC.
fn parse_llc(frame: &[u8], l3_off: usize, dst: MacAddr) -> Result<L3, Malformed> {
    let [dsap, ssap] = array_at::<2>(frame, l3_off)?;
    if dst == STP_GROUP && dsap == LLC_SAP_STP {
        return Ok(L3::Control(Control::Stp));
    }
    Ok(L3::Llc { dsap, ssap })
}

/// Egress lookup key: IPv4 source, ARP sender IP, IPv6 source.
///
/// None when the frame carries no usable source IP: IPv4 or ARP sender 0.0.0.0 (DHCP discover,
/// ARP probe), IPv6 source :: (DAD), control, LLC and other EtherTypes. The caller then looks the
/// VM up by source MAC.
#[inline]
pub fn egress_key(info: &FrameInfo) -> Option<IpKey> {
    match info.l3 {
        L3::Ipv4 { src, .. } | L3::Arp { spa: src, .. } => {
            (src != [0; 4]).then_some(IpKey::V4(src))
        }
        // Unspecified (DAD) and link-local (fe80::/10: RS, MLD, NS for a link-local router)
        // sources identify no table entry: the VM is found by its source MAC instead.
        L3::Ipv6 { src, .. } => {
            (src != [0; 16] && !(src[0] == 0xfe && src[1] & 0xc0 == 0x80)).then_some(IpKey::V6(src))
        }
        L3::Control(_) | L3::Llc { .. } | L3::Other { .. } => None,
    }
}

/// Ingress lookup key: IPv4 destination, ARP target IP, and for IPv6 the destination, except:
/// an NS is keyed by its target (it goes to a solicited-node multicast address), and an NA to a
/// multicast destination (unsolicited, or a DAD defence) by its target. A unicast NA is keyed by
/// its destination: its target is the *sender's* address, the VM is the one that asked.
/// None for control, LLC and other EtherTypes.
#[inline]
pub fn ingress_key(info: &FrameInfo) -> Option<IpKey> {
    match info.l3 {
        L3::Ipv4 { dst, .. } | L3::Arp { tpa: dst, .. } => Some(IpKey::V4(dst)),
        L3::Ipv6 { dst, nd, .. } => {
            let dst_is_multicast = dst[0] == 0xff;
            let key = match nd {
                Some(Nd {
                    icmp_type: ND_NEIGHBOR_SOLICIT,
                    target: Some(target),
                    ..
                }) => target,
                Some(Nd {
                    icmp_type: ND_NEIGHBOR_ADVERT,
                    target: Some(target),
                    ..
                }) if dst_is_multicast => target,
                _ => dst,
            };
            Some(IpKey::V6(key))
        }
        L3::Control(_) | L3::Llc { .. } | L3::Other { .. } => None,
    }
}

/// Overwrite the 6 bytes at `off` with `to` if they currently equal `from`.
#[inline]
fn replace_mac(frame: &mut [u8], off: usize, from: MacAddr, to: MacAddr) -> bool {
    let Some(end) = off.checked_add(6) else {
        return false;
    };
    match frame.get_mut(off..end) {
        Some(addr) if addr == from.0 => {
            addr.copy_from_slice(&to.0);
            true
        }
        _ => false,
    }
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, the first byte at an even word
/// position if `starts_even` (RFC 1071). Not folded.
#[inline]
fn ones_complement_sum(bytes: &[u8], starts_even: bool) -> u64 {
    let mut sum = 0u64;
    let mut high = starts_even;
    for &byte in bytes {
        sum += if high {
            u64::from(byte) << 8
        } else {
            u64::from(byte)
        };
        high = !high;
    }
    sum
}

#[inline]
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 0xffff.
    sum as u16
}

/// Replace a link-layer address inside an ICMPv6 message and patch its checksum incrementally
/// (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')). The pseudo-header does not change, so it is not
/// needed. A correct checksum stays correct and comes out identical to a full recompute; a wrong
/// one stays wrong by the same amount, so the receiver still drops it (we never launder a bad
/// checksum into a good one).
fn replace_mac_in_icmpv6(
    frame: &mut [u8],
    icmp_off: usize,
    addr_off: usize,
    from: MacAddr,
    to: MacAddr,
) -> bool {
    let Some(checksum_off) = icmp_off.checked_add(ICMPV6_CHECKSUM_OFF) else {
        return false;
    };
    let Some(addr_rel) = addr_off.checked_sub(icmp_off) else {
        return false;
    };
    let Ok(old_checksum) = u16_at(frame, checksum_off) else {
        return false;
    };
    if !replace_mac(frame, addr_off, from, to) {
        return false;
    }
    let starts_even = addr_rel % 2 == 0;
    let old_words = fold(ones_complement_sum(&from.0, starts_even));
    let new_words = fold(ones_complement_sum(&to.0, starts_even));
    let sum = u64::from(!old_checksum) + u64::from(!old_words) + u64::from(new_words);
    let new_checksum = !fold(sum);
    if let Some(field) = frame.get_mut(checksum_off..checksum_off + 2) {
        field.copy_from_slice(&new_checksum.to_be_bytes());
    }
    true
}

/// Rewrite a VM's outgoing frame in place, translating its local MAC to the global one:
/// - Ethernet source, which must equal `local`: otherwise nothing is written and the frame is
///   [`EgressRefused::SpoofedSource`];
/// - ARP sender hardware address when it equals `local`;
/// - ND (RS, RA, NS, NA, Redirect) source/target link-layer address options equal to `local`,
///   with the ICMPv6 checksum patched.
///
/// Link-local control frames are refused untouched. VLAN tags are never modified.
/// Returns how many link-layer addresses inside the payload were rewritten (the Ethernet source
/// is not counted).
#[inline]
pub fn try_rewrite_egress(
    frame: &mut [u8],
    info: &FrameInfo,
    local: MacAddr,
    global: MacAddr,
) -> Result<usize, EgressRefused> {
    if let L3::Control(protocol) = info.l3 {
        return Err(EgressRefused::LinkLocalControl(protocol));
    }
    // Compare the frame's own bytes rather than info.src: a stale info cannot make us rewrite.
    if !replace_mac(frame, ETH_SRC_OFF, local, global) {
        return Err(EgressRefused::SpoofedSource);
    }
    let mut rewritten = 0;
    match info.l3 {
        L3::Arp { sha_off, .. } => {
            rewritten += usize::from(replace_mac(frame, sha_off, local, global));
        }
        L3::Ipv6 {
            l4_off,
            nd: Some(nd),
            ..
        } => {
            for addr_off in [nd.slla_off, nd.tlla_off].into_iter().flatten() {
                rewritten += usize::from(replace_mac_in_icmpv6(
                    frame, l4_off, addr_off, local, global,
                ));
            }
        }
        _ => {}
    }
    Ok(rewritten)
}

/// [`try_rewrite_egress`] for callers that have already refused control frames and checked
/// `info.src == local` (the spoofing check): a refused frame is left untouched and counts as 0,
/// indistinguishable from a frame with no payload addresses, so do not skip those checks.
#[inline]
pub fn rewrite_egress(
    frame: &mut [u8],
    info: &FrameInfo,
    local: MacAddr,
    global: MacAddr,
) -> usize {
    try_rewrite_egress(frame, info, local, global).unwrap_or(0)
}

/// Rewrite a frame arriving for a VM in place, translating the global MAC to its local one:
/// - Ethernet destination when it equals `global` (broadcast/multicast destinations are never
///   touched, even if `global` were misconfigured as one);
/// - ARP target hardware address in replies (op 2) when it equals `global`;
/// - ND target link-layer address option equal to `global`, with the ICMPv6 checksum patched.
///
/// Link-local control frames are left untouched. Returns how many link-layer addresses inside the
/// payload were rewritten (the Ethernet destination is not counted). A unicast destination other
/// than `global` is left as is; compare `info.dst` first if such frames should be dropped.
#[inline]
pub fn rewrite_ingress(
    frame: &mut [u8],
    info: &FrameInfo,
    global: MacAddr,
    local: MacAddr,
) -> usize {
    if let L3::Control(_) = info.l3 {
        return 0;
    }
    if !global.is_multicast() {
        replace_mac(frame, ETH_DST_OFF, global, local);
    }
    match info.l3 {
        L3::Arp {
            op: ARP_OP_REPLY,
            tha_off,
            ..
        } => usize::from(replace_mac(frame, tha_off, global, local)),
        L3::Ipv6 {
            l4_off,
            nd:
                Some(Nd {
                    tlla_off: Some(addr_off),
                    ..
                }),
            ..
        } => usize::from(replace_mac_in_icmpv6(
            frame, l4_off, addr_off, global, local,
        )),
        _ => 0,
    }
}

/// True if the frame is ICMPv6 (see [`L3::Ipv6`]), entirely in the slice, and its checksum
/// verifies over the pseudo-header (source, destination, ICMPv6 length, next header 58).
pub fn icmpv6_checksum_ok(frame: &[u8], info: &FrameInfo) -> bool {
    let L3::Ipv6 {
        src,
        dst,
        protocol: IPPROTO_ICMPV6,
        l4_off,
        l4_len,
        ..
    } = info.l3
    else {
        return false;
    };
    let Some(message) = window(frame, l4_off, l4_len) else {
        return false;
    };
    let pseudo_header = ones_complement_sum(&src, true)
        + ones_complement_sum(&dst, true)
        + l4_len as u64
        + u64::from(IPPROTO_ICMPV6);
    fold(pseudo_header + ones_complement_sum(message, true)) == 0xffff
}

/// True if the frame is IPv4 and its header checksum verifies.
pub fn ipv4_header_checksum_ok(frame: &[u8], info: &FrameInfo) -> bool {
    let L3::Ipv4 { l4_off, .. } = info.l3 else {
        return false;
    };
    match frame.get(info.l3_off..l4_off) {
        Some(header) => fold(ones_complement_sum(header, true)) == 0xffff,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::pcap;
    use super::*;
    use crate::net::frames;
    use proptest::prelude::*;
    use std::path::PathBuf;

    const LOCAL: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const GLOBAL: MacAddr = MacAddr([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    const PEER: MacAddr = MacAddr([0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
    const VM_IP4: [u8; 4] = [10, 0, 0, 7];
    const PEER_IP4: [u8; 4] = [192, 0, 2, 1];
    const VM_IP6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
    ];
    const PEER_IP6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];

    // ---- frame builders: written from the RFCs, independent of the code under test ----

    /// Reference checksum over the concatenation of `parts`, computed naively.
    fn internet_checksum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u64 = 0;
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u64::from(word);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ethernet(
        dst: MacAddr,
        src: MacAddr,
        tags: &[(u16, u16)],
        ethertype: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        // Padded to the minimum frame size: short frames carry padding the parser must tolerate.
        frames::padded(frames::ethernet(dst, src, tags, ethertype, payload))
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut header = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
        header[2..4].copy_from_slice(&total.to_be_bytes());
        header.extend_from_slice(&src);
        header.extend_from_slice(&dst);
        let checksum = internet_checksum(&[&header]);
        header[10..12].copy_from_slice(&checksum.to_be_bytes());
        header.extend_from_slice(l4);
        header
    }

    fn udp(payload_len: usize) -> Vec<u8> {
        let mut datagram = vec![0x30, 0x39, 0x00, 0x35];
        datagram.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend((0..payload_len).map(|i| i as u8));
        datagram
    }

    fn tcp() -> Vec<u8> {
        let mut segment = vec![0xc0, 0x00, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02];
        segment.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        segment
    }

    fn arp(op: u16, sha: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) -> Vec<u8> {
        let mut packet = vec![0, 1, 0x08, 0x00, 6, 4];
        packet.extend_from_slice(&op.to_be_bytes());
        packet.extend_from_slice(&sha.0);
        packet.extend_from_slice(&spa);
        packet.extend_from_slice(&tha.0);
        packet.extend_from_slice(&tpa);
        packet
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        packet.extend_from_slice(&[next_header, 255]);
        packet.extend_from_slice(&src);
        packet.extend_from_slice(&dst);
        packet.extend_from_slice(payload);
        packet
    }

    /// IPv6 packet carrying `message` as ICMPv6, checksum filled in.
    fn icmpv6(src: [u8; 16], dst: [u8; 16], mut message: Vec<u8>) -> Vec<u8> {
        let length = (message.len() as u32).to_be_bytes();
        message[2] = 0;
        message[3] = 0;
        let checksum = internet_checksum(&[&src, &dst, &length, &[0, 0, 0, 58], &message]);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
        ipv6(src, dst, 58, &message)
    }

    fn lla_option(kind: u8, mac: MacAddr) -> Vec<u8> {
        let mut option = vec![kind, 1];
        option.extend_from_slice(&mac.0);
        option
    }

    fn neighbor_solicit(target: [u8; 16], slla: Option<MacAddr>) -> Vec<u8> {
        let mut message = vec![135, 0, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&target);
        if let Some(mac) = slla {
            message.extend(lla_option(1, mac));
        }
        message
    }

    fn neighbor_advert(target: [u8; 16], tlla: Option<MacAddr>) -> Vec<u8> {
        let mut message = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        message.extend_from_slice(&target);
        if let Some(mac) = tlla {
            message.extend(lla_option(2, mac));
        }
        message
    }

    fn router_solicit(slla: Option<MacAddr>) -> Vec<u8> {
        let mut message = vec![133, 0, 0, 0, 0, 0, 0, 0];
        if let Some(mac) = slla {
            message.extend(lla_option(1, mac));
        }
        message
    }

    fn solicited_node(addr: [u8; 16]) -> [u8; 16] {
        let mut group = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
        group[13..16].copy_from_slice(&addr[13..16]);
        group
    }

    fn ipv6_multicast_mac(group: [u8; 16]) -> MacAddr {
        MacAddr([0x33, 0x33, group[12], group[13], group[14], group[15]])
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        Ipv4Udp,
        Ipv4Tcp,
        DhcpDiscover,
        ArpRequest,
        ArpReply,
        NeighborSolicit,
        DadSolicit,
        NeighborAdvert,
        RouterSolicit,
        Ipv6Udp,
        Lldp,
        Other,
    }

    const KINDS: [Kind; 12] = [
        Kind::Ipv4Udp,
        Kind::Ipv4Tcp,
        Kind::DhcpDiscover,
        Kind::ArpRequest,
        Kind::ArpReply,
        Kind::NeighborSolicit,
        Kind::DadSolicit,
        Kind::NeighborAdvert,
        Kind::RouterSolicit,
        Kind::Ipv6Udp,
        Kind::Lldp,
        Kind::Other,
    ];

    /// Everything a test frame is built from, so the expected frame after a rewrite can be built
    /// independently by swapping in the other MAC.
    #[derive(Clone, Debug)]
    struct Spec {
        kind: Kind,
        tags: Vec<(u16, u16)>,
        peer: MacAddr,
        vm_ip4: [u8; 4],
        peer_ip4: [u8; 4],
        vm_ip6: [u8; 16],
        peer_ip6: [u8; 16],
        payload_len: usize,
    }

    impl Spec {
        fn new(kind: Kind) -> Self {
            Spec {
                kind,
                tags: Vec::new(),
                peer: PEER,
                vm_ip4: VM_IP4,
                peer_ip4: PEER_IP4,
                vm_ip6: VM_IP6,
                peer_ip6: PEER_IP6,
                payload_len: 32,
            }
        }

        fn tagged(mut self, tags: &[(u16, u16)]) -> Self {
            self.tags = tags.to_vec();
            self
        }

        /// The frame a VM whose MAC is `vm_mac` sends.
        fn egress(&self, vm_mac: MacAddr) -> Vec<u8> {
            let (dst, ethertype, payload) = match self.kind {
                Kind::Ipv4Udp => (
                    self.peer,
                    ETHERTYPE_IPV4,
                    ipv4(self.vm_ip4, self.peer_ip4, 17, &udp(self.payload_len)),
                ),
                Kind::Ipv4Tcp => (
                    self.peer,
                    ETHERTYPE_IPV4,
                    ipv4(self.vm_ip4, self.peer_ip4, 6, &tcp()),
                ),
                Kind::DhcpDiscover => (
                    MacAddr::BROADCAST,
                    ETHERTYPE_IPV4,
                    ipv4([0; 4], [255; 4], 17, &udp(self.payload_len)),
                ),
                Kind::ArpRequest => (
                    MacAddr::BROADCAST,
                    ETHERTYPE_ARP,
                    arp(1, vm_mac, self.vm_ip4, MacAddr::ZERO, self.peer_ip4),
                ),
                Kind::ArpReply => (
                    self.peer,
                    ETHERTYPE_ARP,
                    arp(2, vm_mac, self.vm_ip4, self.peer, self.peer_ip4),
                ),
                Kind::NeighborSolicit => {
                    let group = solicited_node(self.peer_ip6);
                    let message = neighbor_solicit(self.peer_ip6, Some(vm_mac));
                    (
                        ipv6_multicast_mac(group),
                        ETHERTYPE_IPV6,
                        icmpv6(self.vm_ip6, group, message),
                    )
                }
                Kind::DadSolicit => {
                    let group = solicited_node(self.vm_ip6);
                    let message = neighbor_solicit(self.vm_ip6, None);
                    (
                        ipv6_multicast_mac(group),
                        ETHERTYPE_IPV6,
                        icmpv6([0; 16], group, message),
                    )
                }
                Kind::NeighborAdvert => (
                    self.peer,
                    ETHERTYPE_IPV6,
                    icmpv6(
                        self.vm_ip6,
                        self.peer_ip6,
                        neighbor_advert(self.vm_ip6, Some(vm_mac)),
                    ),
                ),
                Kind::RouterSolicit => {
                    let mut all_routers = [0u8; 16];
                    all_routers[0] = 0xff;
                    all_routers[1] = 0x02;
                    all_routers[15] = 2;
                    (
                        ipv6_multicast_mac(all_routers),
                        ETHERTYPE_IPV6,
                        icmpv6(self.vm_ip6, all_routers, router_solicit(Some(vm_mac))),
                    )
                }
                Kind::Ipv6Udp => (
                    self.peer,
                    ETHERTYPE_IPV6,
                    ipv6(self.vm_ip6, self.peer_ip6, 17, &udp(self.payload_len)),
                ),
                Kind::Lldp => (
                    MacAddr([0x01, 0x80, 0xc2, 0, 0, 0x0e]),
                    ETHERTYPE_LLDP,
                    vec![0x02, 0x07, 0x04, 1, 2, 3, 4, 5, 6],
                ),
                Kind::Other => (self.peer, 0x88b5, vec![0xab; self.payload_len]),
            };
            ethernet(dst, vm_mac, &self.tags, ethertype, &payload)
        }

        /// The frame arriving for a VM whose MAC (as the sender believes it) is `vm_mac`.
        fn ingress(&self, vm_mac: MacAddr) -> Vec<u8> {
            let (dst, ethertype, payload) = match self.kind {
                Kind::Ipv4Udp => (
                    vm_mac,
                    ETHERTYPE_IPV4,
                    ipv4(self.peer_ip4, self.vm_ip4, 17, &udp(self.payload_len)),
                ),
                Kind::Ipv4Tcp => (
                    vm_mac,
                    ETHERTYPE_IPV4,
                    ipv4(self.peer_ip4, self.vm_ip4, 6, &tcp()),
                ),
                Kind::DhcpDiscover => (
                    MacAddr::BROADCAST,
                    ETHERTYPE_IPV4,
                    ipv4(self.peer_ip4, [255; 4], 17, &udp(self.payload_len)),
                ),
                Kind::ArpRequest => (
                    MacAddr::BROADCAST,
                    ETHERTYPE_ARP,
                    arp(1, self.peer, self.peer_ip4, MacAddr::ZERO, self.vm_ip4),
                ),
                Kind::ArpReply => (
                    vm_mac,
                    ETHERTYPE_ARP,
                    arp(2, self.peer, self.peer_ip4, vm_mac, self.vm_ip4),
                ),
                Kind::NeighborSolicit | Kind::DadSolicit => {
                    let group = solicited_node(self.vm_ip6);
                    let message = neighbor_solicit(self.vm_ip6, Some(self.peer));
                    (
                        ipv6_multicast_mac(group),
                        ETHERTYPE_IPV6,
                        icmpv6(self.peer_ip6, group, message),
                    )
                }
                // An NA naming the VM's MAC as the target's link-layer address (a reflected
                // advertisement): the TLLA is translated back.
                Kind::NeighborAdvert => (
                    vm_mac,
                    ETHERTYPE_IPV6,
                    icmpv6(
                        self.peer_ip6,
                        self.vm_ip6,
                        neighbor_advert(self.peer_ip6, Some(vm_mac)),
                    ),
                ),
                Kind::RouterSolicit | Kind::Ipv6Udp => (
                    vm_mac,
                    ETHERTYPE_IPV6,
                    ipv6(self.peer_ip6, self.vm_ip6, 17, &udp(self.payload_len)),
                ),
                Kind::Lldp => (
                    MacAddr([0x01, 0x80, 0xc2, 0, 0, 0x0e]),
                    ETHERTYPE_LLDP,
                    vec![0x02, 0x07, 0x04, 1, 2, 3, 4, 5, 6],
                ),
                Kind::Other => (vm_mac, 0x88b5, vec![0xab; self.payload_len]),
            };
            ethernet(dst, self.peer, &self.tags, ethertype, &payload)
        }

        fn egress_payload_rewrites(&self) -> usize {
            match self.kind {
                Kind::ArpRequest
                | Kind::ArpReply
                | Kind::NeighborSolicit
                | Kind::NeighborAdvert
                | Kind::RouterSolicit => 1,
                _ => 0,
            }
        }

        fn ingress_payload_rewrites(&self) -> usize {
            match self.kind {
                Kind::ArpReply | Kind::NeighborAdvert => 1,
                _ => 0,
            }
        }

        fn expected_egress_key(&self) -> Option<IpKey> {
            match self.kind {
                Kind::Ipv4Udp | Kind::Ipv4Tcp | Kind::ArpRequest | Kind::ArpReply => {
                    Some(IpKey::V4(self.vm_ip4))
                }
                Kind::NeighborSolicit
                | Kind::NeighborAdvert
                | Kind::RouterSolicit
                | Kind::Ipv6Udp => Some(IpKey::V6(self.vm_ip6)),
                Kind::DhcpDiscover | Kind::DadSolicit | Kind::Lldp | Kind::Other => None,
            }
        }

        fn expected_ingress_key(&self) -> Option<IpKey> {
            match self.kind {
                Kind::DhcpDiscover => Some(IpKey::V4([255; 4])),
                Kind::Ipv4Udp | Kind::Ipv4Tcp | Kind::ArpRequest | Kind::ArpReply => {
                    Some(IpKey::V4(self.vm_ip4))
                }
                Kind::NeighborSolicit
                | Kind::DadSolicit
                | Kind::NeighborAdvert
                | Kind::RouterSolicit
                | Kind::Ipv6Udp => Some(IpKey::V6(self.vm_ip6)),
                Kind::Lldp | Kind::Other => None,
            }
        }
    }

    const DOT1Q: (u16, u16) = (0x8100, 0x0064);
    const QINQ: [(u16, u16); 2] = [(0x88a8, 0x00c8), (0x8100, 0x07d1)];

    fn tag_variants() -> Vec<Vec<(u16, u16)>> {
        vec![
            vec![],
            vec![DOT1Q],
            QINQ.to_vec(),
            vec![(0x9100, 5), (0x8100, 6)],
        ]
    }

    fn has_nd(info: &FrameInfo) -> bool {
        matches!(info.l3, L3::Ipv6 { nd: Some(_), .. })
    }

    // ---- unit tests ----

    #[test]
    fn mac_addr_display_parse_and_flags() {
        let mac: MacAddr = "02:aa:bb:cc:dd:ee".parse().unwrap();
        assert_eq!(mac, GLOBAL);
        assert_eq!(mac.to_string(), "02:aa:bb:cc:dd:ee");
        assert_eq!("FF:FF:FF:FF:FF:FF".parse(), Ok(MacAddr::BROADCAST));
        for bad in [
            "",
            "02:aa:bb:cc:dd",
            "02:aa:bb:cc:dd:ee:ff",
            "02:aa:bb:cc:dd:e",
            "02:aa:bb:cc:dd:+e",
            "02-aa-bb-cc-dd-ee",
            "02:aa:bb:cc:dd:eg",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(ParseMacAddrError), "{bad:?}");
        }
        assert!(MacAddr::BROADCAST.is_broadcast() && MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert!(!MacAddr([0x33, 0x33, 0, 0, 0, 1]).is_broadcast());
        assert!(!LOCAL.is_multicast() && !GLOBAL.is_multicast());
    }

    #[test]
    fn ip_key_conversions() {
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(IpKey::from(v4), IpKey::V4(VM_IP4));
        assert_eq!(IpKey::from(v6), IpKey::V6(VM_IP6));
        assert_eq!(IpAddr::from(IpKey::V6(VM_IP6)), v6);
        assert_eq!(IpKey::V4(VM_IP4).to_string(), "10.0.0.7");
        assert_eq!(IpKey::V6(VM_IP6).to_string(), "2001:db8::7");
    }

    #[test]
    fn counter_names_are_unique_snake_case() {
        let names: Vec<&str> = Malformed::ALL
            .iter()
            .map(Malformed::as_str)
            .chain(Control::ALL.iter().map(Control::as_str))
            .collect();
        for name in &names {
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
        // Counters index arrays by `m as usize` in ALL order.
        for (index, malformed) in Malformed::ALL.iter().enumerate() {
            assert_eq!(*malformed as usize, index);
        }
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn parses_every_kind_with_every_tag_stack() {
        for kind in KINDS {
            for tags in tag_variants() {
                let spec = Spec::new(kind).tagged(&tags);
                for frame in [spec.egress(LOCAL), spec.ingress(GLOBAL)] {
                    let info = parse(&frame).unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
                    assert_eq!(usize::from(info.vlan_tags), tags.len());
                    assert_eq!(info.l3_off, 14 + 4 * tags.len());
                    let expected_l3 = match kind {
                        Kind::Ipv4Udp | Kind::Ipv4Tcp | Kind::DhcpDiscover => "ipv4",
                        Kind::ArpRequest | Kind::ArpReply => "arp",
                        Kind::Lldp => "lldp",
                        Kind::Other => "other",
                        _ => "ipv6",
                    };
                    let found = match info.l3 {
                        L3::Ipv4 { .. } => "ipv4",
                        L3::Arp { .. } => "arp",
                        L3::Ipv6 { .. } => "ipv6",
                        L3::Control(Control::Lldp) => "lldp",
                        L3::Other { ethertype: 0x88b5 } => "other",
                        _ => "unexpected",
                    };
                    assert_eq!(found, expected_l3, "{kind:?}");
                }
                let info = parse(&spec.egress(LOCAL)).unwrap();
                assert_eq!(info.src, LOCAL);
                assert_eq!(egress_key(&info), spec.expected_egress_key(), "{kind:?}");
                let info = parse(&spec.ingress(GLOBAL)).unwrap();
                assert_eq!(ingress_key(&info), spec.expected_ingress_key(), "{kind:?}");
            }
        }
    }

    #[test]
    fn parse_records_ipv4_fields() {
        let frame = Spec::new(Kind::Ipv4Tcp).egress(LOCAL);
        let info = parse(&frame).unwrap();
        assert_eq!(info.dst, PEER);
        assert_eq!(info.ethertype, ETHERTYPE_IPV4);
        assert_eq!(
            info.l3,
            L3::Ipv4 {
                src: VM_IP4,
                dst: PEER_IP4,
                protocol: 6,
                l4_off: 34
            }
        );
        assert!(ipv4_header_checksum_ok(&frame, &info));
    }

    #[test]
    fn parse_records_arp_fields_despite_padding() {
        let frame = Spec::new(Kind::ArpReply).tagged(&[DOT1Q]).egress(LOCAL);
        assert_eq!(frame.len(), 60, "builder pads short frames");
        let info = parse(&frame).unwrap();
        assert_eq!(
            info.l3,
            L3::Arp {
                op: 2,
                spa: VM_IP4,
                tpa: PEER_IP4,
                sha_off: 26,
                tha_off: 36
            }
        );
        assert_eq!(&frame[26..32], &LOCAL.0);
    }

    #[test]
    fn parse_records_nd_fields() {
        let frame = Spec::new(Kind::NeighborSolicit).egress(LOCAL);
        let info = parse(&frame).unwrap();
        let L3::Ipv6 {
            protocol,
            l4_off,
            l4_len,
            nd: Some(nd),
            ..
        } = info.l3
        else {
            panic!("not ND: {info:?}");
        };
        assert_eq!((protocol, l4_off, l4_len), (58, 54, 32));
        assert_eq!(nd.icmp_type, ND_NEIGHBOR_SOLICIT);
        assert_eq!(nd.target, Some(PEER_IP6));
        assert_eq!(nd.slla_off, Some(54 + 24 + 2));
        assert_eq!(nd.tlla_off, None);
        assert!(icmpv6_checksum_ok(&frame, &info));

        let frame = Spec::new(Kind::RouterSolicit).egress(LOCAL);
        let info = parse(&frame).unwrap();
        let L3::Ipv6 { nd: Some(nd), .. } = info.l3 else {
            panic!("not ND");
        };
        assert_eq!((nd.icmp_type, nd.target), (ND_ROUTER_SOLICIT, None));
        assert_eq!(nd.slla_off, Some(54 + 8 + 2));
    }

    #[test]
    fn ingress_key_of_neighbor_advert_depends_on_destination() {
        // Solicited NA: unicast to the VM that asked; the target is the sender's own address.
        let frame = Spec::new(Kind::NeighborAdvert).ingress(GLOBAL);
        assert_eq!(
            ingress_key(&parse(&frame).unwrap()),
            Some(IpKey::V6(VM_IP6))
        );
        // Unsolicited NA (or DAD defence) to all-nodes: the target names the VM.
        let all_nodes = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let packet = icmpv6(PEER_IP6, all_nodes, neighbor_advert(VM_IP6, Some(PEER)));
        let frame = ethernet(ipv6_multicast_mac(all_nodes), PEER, &[], 0x86dd, &packet);
        assert_eq!(
            ingress_key(&parse(&frame).unwrap()),
            Some(IpKey::V6(VM_IP6))
        );
    }

    #[test]
    fn egress_rewrite_matches_independently_built_frame() {
        for kind in KINDS {
            for tags in tag_variants() {
                let spec = Spec::new(kind).tagged(&tags);
                let mut frame = spec.egress(LOCAL);
                let info = parse(&frame).unwrap();
                let result = try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL);
                if kind == Kind::Lldp {
                    assert_eq!(result, Err(EgressRefused::LinkLocalControl(Control::Lldp)));
                    assert_eq!(frame, spec.egress(LOCAL), "control frames untouched");
                    continue;
                }
                assert_eq!(result, Ok(spec.egress_payload_rewrites()), "{kind:?}");
                assert_eq!(frame, spec.egress(GLOBAL), "{kind:?} {tags:?}");
                let info = parse(&frame).unwrap();
                if has_nd(&info) {
                    assert!(icmpv6_checksum_ok(&frame, &info), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn ingress_rewrite_matches_independently_built_frame() {
        for kind in KINDS {
            for tags in tag_variants() {
                let spec = Spec::new(kind).tagged(&tags);
                let mut frame = spec.ingress(GLOBAL);
                let info = parse(&frame).unwrap();
                let rewritten = rewrite_ingress(&mut frame, &info, GLOBAL, LOCAL);
                assert_eq!(rewritten, spec.ingress_payload_rewrites(), "{kind:?}");
                assert_eq!(frame, spec.ingress(LOCAL), "{kind:?} {tags:?}");
                let info = parse(&frame).unwrap();
                if has_nd(&info) {
                    assert!(icmpv6_checksum_ok(&frame, &info), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn egress_rewrite_changes_exactly_the_mac_and_checksum_bytes() {
        let mut frame = Spec::new(Kind::NeighborSolicit).tagged(&QINQ).egress(LOCAL);
        let original = frame.clone();
        let info = parse(&frame).unwrap();
        assert_eq!(try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), Ok(1));
        let changed: Vec<usize> = (0..frame.len())
            .filter(|&i| frame[i] != original[i])
            .collect();
        let L3::Ipv6 {
            l4_off,
            nd: Some(nd),
            ..
        } = info.l3
        else {
            panic!("not ND");
        };
        let slla = nd.slla_off.unwrap();
        let allowed: Vec<usize> = (6..12)
            .chain(slla..slla + 6)
            .chain(l4_off + 2..l4_off + 4)
            .collect();
        assert!(changed.iter().all(|i| allowed.contains(i)), "{changed:?}");
        assert_eq!(&frame[12..22], &original[12..22], "QinQ tags preserved");
    }

    #[test]
    fn spoofed_source_is_refused_untouched() {
        let spec = Spec::new(Kind::ArpRequest);
        let mut frame = spec.egress(PEER);
        let info = parse(&frame).unwrap();
        assert_eq!(
            try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL),
            Err(EgressRefused::SpoofedSource)
        );
        assert_eq!(frame, spec.egress(PEER));
        // The unchecked wrapper leaves it untouched too, reporting 0.
        assert_eq!(rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), 0);
        assert_eq!(frame, spec.egress(PEER));
        let mut frame = Spec::new(Kind::NeighborSolicit).egress(LOCAL);
        let info = parse(&frame).unwrap();
        assert_eq!(rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), 1);
        assert_eq!(frame, Spec::new(Kind::NeighborSolicit).egress(GLOBAL));
    }

    #[test]
    fn ingress_never_touches_group_destinations() {
        let spec = Spec::new(Kind::DhcpDiscover);
        let mut frame = spec.ingress(GLOBAL);
        let info = parse(&frame).unwrap();
        assert_eq!(rewrite_ingress(&mut frame, &info, GLOBAL, LOCAL), 0);
        assert_eq!(frame, spec.ingress(GLOBAL));
        // Even a misconfigured multicast "global" MAC is not matched.
        let group = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
        let mut frame = Spec::new(Kind::Ipv4Udp).ingress(group);
        let before = frame.clone();
        let info = parse(&frame).unwrap();
        rewrite_ingress(&mut frame, &info, group, LOCAL);
        assert_eq!(frame, before);
    }

    #[test]
    fn ingress_arp_request_tha_is_left_alone() {
        // Only replies carry the VM's address in THA; a request's THA is whatever the asker put.
        let packet = arp(1, PEER, PEER_IP4, GLOBAL, VM_IP4);
        let mut frame = ethernet(GLOBAL, PEER, &[], ETHERTYPE_ARP, &packet);
        let info = parse(&frame).unwrap();
        assert_eq!(rewrite_ingress(&mut frame, &info, GLOBAL, LOCAL), 0);
        assert_eq!(&frame[0..6], &LOCAL.0);
        assert_eq!(&frame[32..38], &GLOBAL.0);
    }

    #[test]
    fn wrong_icmpv6_checksum_stays_wrong() {
        let mut frame = Spec::new(Kind::NeighborAdvert).egress(LOCAL);
        let info = parse(&frame).unwrap();
        let L3::Ipv6 { l4_off, .. } = info.l3 else {
            panic!("not IPv6");
        };
        // Damage the checksum by a known one's-complement amount.
        let ones_add = |a: u16, b: u16| {
            let sum = u32::from(a) + u32::from(b);
            ((sum & 0xffff) + (sum >> 16)) as u16
        };
        let checksum_at = |frame: &[u8]| u16::from_be_bytes([frame[l4_off + 2], frame[l4_off + 3]]);
        let damaged = ones_add(checksum_at(&frame), 0x0100);
        frame[l4_off + 2..l4_off + 4].copy_from_slice(&damaged.to_be_bytes());
        assert!(!icmpv6_checksum_ok(&frame, &info));
        assert_eq!(try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), Ok(1));
        assert!(!icmpv6_checksum_ok(&frame, &info));
        // The error is carried exactly: the same damage applied to the correct frame.
        let mut expected = Spec::new(Kind::NeighborAdvert).egress(GLOBAL);
        let damaged = ones_add(checksum_at(&expected), 0x0100);
        expected[l4_off + 2..l4_off + 4].copy_from_slice(&damaged.to_be_bytes());
        assert_eq!(frame, expected);
    }

    #[test]
    fn malformed_frames_are_classified() {
        let ipv4_frame = Spec::new(Kind::Ipv4Udp).egress(LOCAL);
        let mut bad_version = ipv4_frame.clone();
        bad_version[14] = 0x65;
        assert_eq!(parse(&bad_version), Err(Malformed::BadIpv4));
        let mut bad_ihl = ipv4_frame.clone();
        bad_ihl[14] = 0x44;
        assert_eq!(parse(&bad_ihl), Err(Malformed::BadIpv4));
        let mut short_total = ipv4_frame.clone();
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse(&short_total), Err(Malformed::BadIpv4));
        let mut long_ihl = ipv4_frame[..34].to_vec();
        long_ihl[14] = 0x4f;
        assert_eq!(parse(&long_ihl), Err(Malformed::Truncated));

        let ipv6_frame = Spec::new(Kind::NeighborSolicit).egress(LOCAL);
        let mut bad_version = ipv6_frame.clone();
        bad_version[14] = 0x40;
        assert_eq!(parse(&bad_version), Err(Malformed::BadIpv6));
        let mut zero_option = ipv6_frame.clone();
        zero_option[14 + 40 + 24 + 1] = 0;
        assert_eq!(parse(&zero_option), Err(Malformed::BadNdOption));
        let mut long_option = ipv6_frame.clone();
        long_option[14 + 40 + 24 + 1] = 2;
        assert_eq!(parse(&long_option), Err(Malformed::BadNdOption));
        let mut short_nd = ipv6_frame.clone();
        short_nd[18..20].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse(&short_nd), Err(Malformed::BadNd));
        let mut overlong_payload = ipv6_frame.clone();
        overlong_payload[18..20].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(parse(&overlong_payload), Err(Malformed::Truncated));

        let mut message = neighbor_solicit(PEER_IP6, Some(LOCAL));
        message.extend(lla_option(1, PEER));
        let packet = icmpv6(VM_IP6, PEER_IP6, message);
        let frame = ethernet(PEER, LOCAL, &[], ETHERTYPE_IPV6, &packet);
        assert_eq!(parse(&frame), Err(Malformed::BadNdOption), "duplicate SLLA");

        let arp_frame = Spec::new(Kind::ArpRequest).egress(LOCAL);
        for (byte, value) in [(14, 0x00), (15, 6), (16, 0x86), (18, 8), (19, 16)] {
            let mut bad = arp_frame.clone();
            bad[byte] = value;
            if byte == 14 {
                bad[15] = 6; // htype 6 (IEEE 802)
            }
            assert_eq!(parse(&bad), Err(Malformed::BadArp), "byte {byte}");
        }

        let three_tags = ethernet(
            PEER,
            LOCAL,
            &[(0x88a8, 1), (0x8100, 2), (0x8100, 3)],
            ETHERTYPE_IPV4,
            &ipv4(VM_IP4, PEER_IP4, 17, &udp(8)),
        );
        assert_eq!(parse(&three_tags), Err(Malformed::TooManyTags));
    }

    #[test]
    fn hop_by_hop_before_icmpv6_is_walked() {
        let message = neighbor_advert(VM_IP6, Some(LOCAL));
        let length = (message.len() as u32).to_be_bytes();
        let mut message = message;
        let checksum = internet_checksum(&[&VM_IP6, &PEER_IP6, &length, &[0, 0, 0, 58], &message]);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
        let mut payload = vec![58, 0, 5, 2, 0, 0, 1, 0]; // Hop-by-Hop with a router alert
        payload.extend_from_slice(&message);
        let packet = ipv6(VM_IP6, PEER_IP6, 0, &payload);
        let mut frame = ethernet(PEER, LOCAL, &[], ETHERTYPE_IPV6, &packet);
        let info = parse(&frame).unwrap();
        assert!(matches!(
            info.l3,
            L3::Ipv6 {
                protocol: 58,
                l4_off: 62,
                l4_len: 32,
                nd: Some(_),
                ..
            }
        ));
        assert!(icmpv6_checksum_ok(&frame, &info));
        assert_eq!(try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), Ok(1));
        assert!(icmpv6_checksum_ok(&frame, &info));
    }

    #[test]
    fn stp_and_llc() {
        let bpdu = [0x42, 0x42, 0x03, 0, 0, 0x02, 0x02];
        let frame = ethernet(STP_GROUP, PEER, &[], bpdu.len() as u16, &bpdu);
        assert_eq!(parse(&frame).unwrap().l3, L3::Control(Control::Stp));
        let snap = [0xaa, 0xaa, 0x03, 0, 0, 0x0c, 0x20, 0];
        let cdp = MacAddr([0x01, 0x00, 0x0c, 0xcc, 0xcc, 0xcc]);
        let frame = ethernet(cdp, PEER, &[], snap.len() as u16, &snap);
        assert_eq!(
            parse(&frame).unwrap().l3,
            L3::Llc {
                dsap: 0xaa,
                ssap: 0xaa
            }
        );
    }

    #[test]
    fn jumbo_frames() {
        let mut spec = Spec::new(Kind::Ipv4Udp).tagged(&[DOT1Q]);
        spec.payload_len = 9000 - 14 - 4 - 20 - 8;
        let mut frame = spec.egress(LOCAL);
        assert_eq!(frame.len(), 9000);
        let info = parse(&frame).unwrap();
        assert_eq!(egress_key(&info), Some(IpKey::V4(VM_IP4)));
        assert_eq!(try_rewrite_egress(&mut frame, &info, LOCAL, GLOBAL), Ok(0));
        assert_eq!(frame, spec.egress(GLOBAL));

        // A jumbo ICMPv6 echo: checksum over ~9 KB, not ND.
        let mut message = vec![128, 0, 0, 0, 0, 1, 0, 1];
        message.extend((0..8900).map(|i| (i * 7) as u8));
        let packet = icmpv6(VM_IP6, PEER_IP6, message);
        let frame = ethernet(PEER, LOCAL, &[], ETHERTYPE_IPV6, &packet);
        let info = parse(&frame).unwrap();
        assert!(!has_nd(&info));
        assert!(icmpv6_checksum_ok(&frame, &info));
    }

    #[test]
    fn truncation_at_every_length() {
        for kind in KINDS {
            for tags in tag_variants() {
                let spec = Spec::new(kind).tagged(&tags);
                let full = spec.egress(LOCAL);
                let full_info = parse(&full).unwrap();
                for len in 0..=full.len() {
                    let mut cut = full[..len].to_vec();
                    match parse(&cut) {
                        Ok(info) => {
                            // Whatever parses from a prefix agrees with the whole frame.
                            assert_eq!(info.l3_off, full_info.l3_off);
                            assert_eq!(egress_key(&info), egress_key(&full_info));
                            assert_eq!(ingress_key(&info), ingress_key(&full_info));
                            let _ = try_rewrite_egress(&mut cut, &info, LOCAL, GLOBAL);
                            let _ = rewrite_ingress(&mut cut, &info, GLOBAL, LOCAL);
                        }
                        Err(error) => {
                            assert!(len < full.len(), "{kind:?} len {len}: {error:?}");
                            assert_eq!(error, Malformed::Truncated, "{kind:?} len {len}");
                        }
                    }
                    // The full frame's offsets applied to the prefix must not panic either.
                    let _ = try_rewrite_egress(&mut cut, &full_info, LOCAL, GLOBAL);
                    let _ = rewrite_ingress(&mut cut, &full_info, GLOBAL, LOCAL);
                    let _ = icmpv6_checksum_ok(&cut, &full_info);
                    let _ = ipv4_header_checksum_ok(&cut, &full_info);
                }
            }
        }
    }

    #[test]
    fn forged_offsets_do_not_panic() {
        let mut frame = Spec::new(Kind::NeighborAdvert).egress(LOCAL);
        let forged = FrameInfo {
            dst: PEER,
            src: LOCAL,
            vlan_tags: 0,
            ethertype: ETHERTYPE_IPV6,
            l3_off: usize::MAX,
            l3: L3::Ipv6 {
                src: VM_IP6,
                dst: PEER_IP6,
                protocol: 58,
                l4_off: usize::MAX - 1,
                l4_len: usize::MAX,
                nd: Some(Nd {
                    icmp_type: ND_NEIGHBOR_ADVERT,
                    target: None,
                    slla_off: Some(usize::MAX - 3),
                    tlla_off: Some(usize::MAX),
                }),
            },
        };
        let _ = try_rewrite_egress(&mut frame, &forged, LOCAL, GLOBAL);
        let _ = rewrite_ingress(&mut frame, &forged, GLOBAL, LOCAL);
        assert!(!icmpv6_checksum_ok(&frame, &forged));
        let forged_arp = FrameInfo {
            l3: L3::Arp {
                op: 2,
                spa: VM_IP4,
                tpa: PEER_IP4,
                sha_off: usize::MAX - 2,
                tha_off: usize::MAX,
            },
            ..forged
        };
        let _ = try_rewrite_egress(&mut frame, &forged_arp, LOCAL, GLOBAL);
        let _ = rewrite_ingress(&mut frame, &forged_arp, GLOBAL, LOCAL);
    }

    // ---- real captures ----

    /// The shared capture directory: `$HOSTPLANE_PCAPS` if set (for scratch builds), else
    /// `../shared/pcaps` beside the project root.
    fn pcap_dir() -> Option<PathBuf> {
        let candidates = [
            std::env::var_os("HOSTPLANE_PCAPS").map(PathBuf::from),
            Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/pcaps"
            ))),
        ];
        let found = candidates.into_iter().flatten().find(|dir| dir.is_dir());
        if found.is_none() {
            println!("skipped: ../shared/pcaps absent");
        }
        found
    }

    fn load_pcap(dir: &std::path::Path, name: &str) -> Vec<Vec<u8>> {
        pcap::read_frames(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_capture_frame_parses_without_panic() {
        let Some(dir) = pcap_dir() else {
            return;
        };
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("pcap") {
                continue; // pcapng and README are not classic pcap
            }
            files += 1;
            let frames = pcap::read_frames(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            for frame in frames {
                let Ok(info) = parse(&frame) else {
                    continue;
                };
                let _ = egress_key(&info);
                let _ = ingress_key(&info);
                let checksum_ok = icmpv6_checksum_ok(&frame, &info);
                for (from, to) in [(info.src, GLOBAL), (info.dst, LOCAL)] {
                    let mut copy = frame.clone();
                    let _ = try_rewrite_egress(&mut copy, &info, from, to);
                    assert_eq!(icmpv6_checksum_ok(&copy, &info), checksum_ok, "{path:?}");
                    let mut copy = frame.clone();
                    rewrite_ingress(&mut copy, &info, from, to);
                    assert_eq!(icmpv6_checksum_ok(&copy, &info), checksum_ok, "{path:?}");
                }
            }
        }
        assert!(files >= 10, "expected the shared captures in {dir:?}");
    }

    #[test]
    fn captures_parse_as_expected() {
        let Some(dir) = pcap_dir() else {
            return;
        };
        let frames = load_pcap(&dir, "arp-too-long-tha.pcap");
        assert_eq!(frames.len(), 1);
        assert_eq!(parse(&frames[0]), Err(Malformed::BadArp));

        let frames = load_pcap(&dir, "icmpv6-ns-nonce.pcap");
        let info = parse(&frames[0]).unwrap();
        let L3::Ipv6 {
            src, nd: Some(nd), ..
        } = info.l3
        else {
            panic!("not ND: {info:?}");
        };
        let target: Ipv6Addr = "fe80::546f:f7ff:fee1:f".parse().unwrap();
        assert_eq!(nd.icmp_type, ND_NEIGHBOR_SOLICIT);
        assert_eq!(nd.target, Some(target.octets()));
        assert_eq!((src, nd.slla_off, nd.tlla_off), ([0; 16], None, None));
        assert_eq!(egress_key(&info), None, "DAD has no source address");
        assert_eq!(ingress_key(&info), Some(IpKey::from(target)));
        assert!(icmpv6_checksum_ok(&frames[0], &info));

        let frames = load_pcap(&dir, "802.1ad_QinQ.pcap");
        let infos: Vec<FrameInfo> = frames.iter().map(|f| parse(f).unwrap()).collect();
        assert_eq!(infos.len(), 2);
        assert!(infos.iter().all(|i| i.vlan_tags == 2 && i.l3_off == 22));
        assert!(matches!(infos[0].l3, L3::Arp { op: 1, .. }));
        assert!(matches!(infos[1].l3, L3::Arp { op: 2, .. }));
        let asker = IpKey::V4([172, 21, 79, 97]);
        assert_eq!(egress_key(&infos[0]), Some(asker));
        assert_eq!(ingress_key(&infos[1]), Some(asker));
        // The reply, translated as if the asker were a VM behind 00:20:d2:5a:fb:3f.
        let mut reply = frames[1].clone();
        let vm_global = infos[0].src;
        assert_eq!(rewrite_ingress(&mut reply, &infos[1], vm_global, LOCAL), 1);
        assert_eq!(&reply[0..6], &LOCAL.0);
        assert_eq!(&reply[12..22], &frames[1][12..22], "tags preserved");

        let expect_all = |name: &str, expected: L3| {
            let frames = load_pcap(&dir, name);
            assert!(!frames.is_empty());
            for frame in frames {
                assert_eq!(parse(&frame).map(|i| i.l3), Ok(expected), "{name}");
            }
        };
        expect_all("802.1w_rapid_STP.pcap", L3::Control(Control::Stp));
        expect_all("LACP.pcap", L3::Control(Control::Lacp));

        let kinds: Vec<L3> = load_pcap(&dir, "LLDP_and_CDP.pcap")
            .iter()
            .map(|f| parse(f).unwrap().l3)
            .collect();
        let lldp = kinds
            .iter()
            .filter(|l3| **l3 == L3::Control(Control::Lldp))
            .count();
        let llc = kinds
            .iter()
            .filter(|l3| matches!(l3, L3::Llc { dsap: 0xaa, .. }))
            .count();
        assert_eq!((lldp, llc), (8, 4));

        let dhcp = load_pcap(&dir, "dhcp-rfc3004.pcap");
        for (index, frame) in dhcp.iter().enumerate() {
            let info = parse(frame).unwrap();
            assert!(ipv4_header_checksum_ok(frame, &info));
            // Requests come from 0.0.0.0, replies from the server.
            assert_eq!(egress_key(&info).is_none(), index % 2 == 0, "frame {index}");
        }

        for name in ["icmpv6.pcap", "icmpv6-ra-pref64.pcap"] {
            for frame in load_pcap(&dir, name) {
                let info = parse(&frame).unwrap();
                assert!(icmpv6_checksum_ok(&frame, &info), "{name}");
            }
        }
        let ra = load_pcap(&dir, "icmpv6-ra-pref64.pcap");
        let info = parse(&ra[0]).unwrap();
        assert!(matches!(
            info.l3,
            L3::Ipv6 {
                nd: Some(Nd {
                    icmp_type: ND_ROUTER_ADVERT,
                    ..
                }),
                ..
            }
        ));

        let arp_frames = load_pcap(&dir, "arp-oobr.pcap");
        let rejected = arp_frames.iter().filter(|f| parse(f).is_err()).count();
        assert!(rejected > 0 && rejected < arp_frames.len());
    }

    // ---- property tests ----

    fn mac_strategy() -> impl Strategy<Value = MacAddr> {
        // Unicast, as a VM's or the host's MAC is.
        any::<[u8; 6]>().prop_map(|mut bytes| {
            bytes[0] &= 0xfe;
            MacAddr(bytes)
        })
    }

    fn spec_strategy() -> impl Strategy<Value = Spec> {
        let tags = prop::collection::vec(
            (
                prop::sample::select(vec![0x8100u16, 0x88a8, 0x9100]),
                any::<u16>(),
            ),
            0..=2,
        );
        (
            prop::sample::select(KINDS.to_vec()),
            tags,
            mac_strategy(),
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            0usize..1500,
        )
            .prop_map(
                |(kind, tags, peer, vm_ip4, peer_ip4, vm_ip6, peer_ip6, payload_len)| Spec {
                    kind,
                    tags,
                    peer,
                    vm_ip4,
                    peer_ip4,
                    vm_ip6,
                    peer_ip6,
                    payload_len,
                },
            )
    }

    fn exercise(frame: &[u8], local: MacAddr, global: MacAddr) {
        if let Ok(info) = parse(frame) {
            let _ = egress_key(&info);
            let _ = ingress_key(&info);
            let _ = icmpv6_checksum_ok(frame, &info);
            let _ = ipv4_header_checksum_ok(frame, &info);
            let mut copy = frame.to_vec();
            let _ = try_rewrite_egress(&mut copy, &info, local, global);
            let mut copy = frame.to_vec();
            let _ = rewrite_ingress(&mut copy, &info, global, local);
            // Egress with the frame's own source always passes the spoof check.
            let mut copy = frame.to_vec();
            let _ = try_rewrite_egress(&mut copy, &info, info.src, global);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            local in mac_strategy(),
            global in mac_strategy(),
        ) {
            exercise(&bytes, local, global);
        }

        #[test]
        fn random_payload_behind_real_ethertypes_never_panics(
            ethertype in prop::sample::select(vec![0x0800u16, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x0026]),
            mut body in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            // Steer the IPv6 case into ICMPv6/ND often enough to reach the option walker.
            if ethertype == 0x86dd && body.len() > 41 {
                body[0] = 0x60;
                body[6] = 58;
                body[40] = 133 + body[40] % 5;
            }
            let frame = ethernet(PEER, LOCAL, &[], ethertype, &body);
            exercise(&frame, LOCAL, GLOBAL);
        }

        #[test]
        fn egress_rewrite_round_trips(spec in spec_strategy(), local in mac_strategy(), global in mac_strategy()) {
            prop_assume!(local != global && spec.peer != global && spec.peer != local);
            prop_assume!(spec.kind != Kind::Lldp);
            let original = spec.egress(local);
            let mut frame = original.clone();
            let info = parse(&frame).unwrap();
            prop_assert_eq!(try_rewrite_egress(&mut frame, &info, local, global), Ok(spec.egress_payload_rewrites()));
            prop_assert_eq!(&frame, &spec.egress(global));
            let back = parse(&frame).unwrap();
            prop_assert_eq!(try_rewrite_egress(&mut frame, &back, global, local), Ok(spec.egress_payload_rewrites()));
            prop_assert_eq!(frame, original);
        }

        #[test]
        fn ingress_rewrite_round_trips(spec in spec_strategy(), local in mac_strategy(), global in mac_strategy()) {
            prop_assume!(local != global && spec.peer != global && spec.peer != local);
            let original = spec.ingress(global);
            let mut frame = original.clone();
            let info = parse(&frame).unwrap();
            prop_assert_eq!(rewrite_ingress(&mut frame, &info, global, local), spec.ingress_payload_rewrites());
            prop_assert_eq!(&frame, &spec.ingress(local));
            let back = parse(&frame).unwrap();
            rewrite_ingress(&mut frame, &back, local, global);
            prop_assert_eq!(frame, original);
        }

        #[test]
        fn checksums_verify_after_rewrite(spec in spec_strategy(), local in mac_strategy(), global in mac_strategy()) {
            prop_assume!(local != global);
            let mut frame = spec.egress(local);
            let info = parse(&frame).unwrap();
            let nd = has_nd(&info);
            prop_assert_eq!(icmpv6_checksum_ok(&frame, &info), nd);
            let _ = try_rewrite_egress(&mut frame, &info, local, global);
            prop_assert_eq!(icmpv6_checksum_ok(&frame, &info), nd);
            let mut frame = spec.ingress(global);
            let info = parse(&frame).unwrap();
            rewrite_ingress(&mut frame, &info, global, local);
            prop_assert_eq!(icmpv6_checksum_ok(&frame, &info), has_nd(&info));
            if let L3::Ipv4 { .. } = info.l3 {
                prop_assert!(ipv4_header_checksum_ok(&frame, &info));
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            spec in spec_strategy(),
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let original = spec.egress(LOCAL);
            let original_info = parse(&original).unwrap();
            let mut frame = original.clone();
            for (index, value) in &mutations {
                let at = index.index(frame.len());
                frame[at] = *value;
            }
            exercise(&frame, LOCAL, GLOBAL);
            let len = cut.index(frame.len() + 1);
            exercise(&frame[..len], LOCAL, GLOBAL);
            // The unmutated frame's offsets applied to the mutated, cut frame: a stale FrameInfo
            // must not make a rewrite panic either.
            let mut cut_frame = frame[..len].to_vec();
            let _ = try_rewrite_egress(&mut cut_frame, &original_info, LOCAL, GLOBAL);
            let _ = rewrite_ingress(&mut cut_frame, &original_info, GLOBAL, LOCAL);
            let _ = icmpv6_checksum_ok(&cut_frame, &original_info);
        }
    }
}
