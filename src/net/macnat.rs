//! The MAC-NAT table: VM IP → (local MAC, global MAC, VM-side port), plus a local-MAC index for
//! VMs that have no IP yet (DHCP, IPv6 DAD).
//!
//! Net lcores read it through [`super::rcu`] with no lock; the control plane changes it by
//! building a new version and swapping it in ([`MacNatTable`] is the shared handle).

use super::ipv4map::Ipv4BindingMap;
use super::packet::{IpKey, MacAddr};
use super::rcu::{Rcu, RcuReader};
use std::collections::HashMap;
use std::net::IpAddr;

type Hasher = ahash::RandomState;

/// One VM address binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacNatEntry {
    /// The VM's IP.
    pub ip: IpKey,
    /// The MAC the VM uses (seen only on the VM side).
    pub local: MacAddr,
    /// The MAC the physical network sees.
    pub global: MacAddr,
    /// The VM-side port (ethdev id) that owns the VM.
    pub port: u16,
}

/// What the data path needs after a hit, kept small (16 bytes) so buckets stay dense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Local MAC.
    pub local: MacAddr,
    /// Global MAC.
    pub global: MacAddr,
    /// VM-side port.
    pub port: u16,
}

/// Why an entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacNatError {
    /// Multicast/broadcast/zero MACs cannot be bindings.
    #[error("{field}: {mac} is not a unicast MAC")]
    NotUnicast {
        /// "local_mac" or "global_mac".
        field: &'static str,
        /// The MAC.
        mac: MacAddr,
    },
    /// The IP cannot identify a VM.
    #[error("ip: {0} is not a unicast address")]
    BadIp(IpAddr),
    /// The same local MAC already maps to another global MAC.
    #[error("local_mac: {local} is already bound to global MAC {existing}")]
    LocalMacConflict {
        /// The local MAC.
        local: MacAddr,
        /// Its existing global MAC.
        existing: MacAddr,
    },
    /// Delete of an IP not in the table.
    #[error("ip: {0} is not in the table")]
    NotFound(IpAddr),
    /// The port id is larger than any DPDK port can have here.
    #[error("port: {0} is above {max}, the largest port id MAC-NAT keeps", max = super::ipv4map::MAX_PORT)]
    BadPort(u16),
    /// local == global makes translation meaningless and hides spoofing.
    #[error("local_mac and global_mac are both {0}")]
    SameMac(MacAddr),
}

/// An IPv4 address (host order) as the data path's map keys it: its bytes in network order,
/// read as a native integer, the way the fast path loads it from a frame.
fn map_key(host_order: u32) -> u32 {
    u32::from_ne_bytes(host_order.to_be_bytes())
}

/// One immutable version of the table.
#[derive(Clone)]
pub struct MacNatVersion {
    v4: HashMap<u32, Binding, Hasher>,
    v6: HashMap<u128, Binding, Hasher>,
    /// local MAC → (global MAC, port, number of IPs using it).
    by_local: HashMap<MacAddr, (Binding, u32), Hasher>,
    /// The data path's copy of `v4`, rebuilt by [`MacNatVersion::reindex`] after changes.
    fast_v4: Ipv4BindingMap,
}

impl Default for MacNatVersion {
    fn default() -> Self {
        // Fixed seeds: the hash must be identical in every version (the table is cloned).
        let h = Hasher::with_seeds(
            0x5157_4e41_5448_4f53,
            0x7468_6f73_7470_6c61,
            0x6e65_6d61_636e_6174,
            0x0123_4567_89ab_cdef,
        );
        MacNatVersion {
            v4: HashMap::with_hasher(h.clone()),
            v6: HashMap::with_hasher(h.clone()),
            by_local: HashMap::with_hasher(h),
            fast_v4: Ipv4BindingMap::default(),
        }
    }
}

impl MacNatVersion {
    /// Builds a version from entries (later entries replace earlier ones with the same IP).
    pub fn from_entries(entries: &[MacNatEntry]) -> Result<Self, MacNatError> {
        let mut v = MacNatVersion::default();
        v.v4.reserve(entries.len());
        for e in entries {
            v.insert(*e)?;
        }
        v.reindex();
        Ok(v)
    }

    /// Rebuilds the data path's IPv4 map from the entries; call after insert/remove.
    pub(crate) fn reindex(&mut self) {
        self.fast_v4 = Ipv4BindingMap::build(
            self.v4.iter().map(|(k, b)| (map_key(*k), *b)),
            self.v4.len(),
        );
    }

    /// Lookup by IP.
    #[inline(always)]
    pub fn lookup(&self, ip: IpKey) -> Option<Binding> {
        match ip {
            IpKey::V4(a) => self.fast_v4.get(u32::from_ne_bytes(a)),
            IpKey::V6(a) => self.v6.get(&u128::from_be_bytes(a)).copied(),
        }
    }

    /// The data path's IPv4 map (burst lookups hash once and prefetch through it).
    #[inline(always)]
    pub fn v4_map(&self) -> &Ipv4BindingMap {
        &self.fast_v4
    }

    /// Lookup by the VM's local MAC (VMs without an IP yet).
    #[inline]
    pub fn lookup_local_mac(&self, mac: MacAddr) -> Option<Binding> {
        self.by_local.get(&mac).map(|(b, _)| *b)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts or replaces one entry (the data path sees it after [`MacNatVersion::reindex`]).
    pub(crate) fn insert(&mut self, e: MacNatEntry) -> Result<(), MacNatError> {
        for (field, mac) in [("local_mac", e.local), ("global_mac", e.global)] {
            if mac.is_multicast() || mac.0 == [0; 6] {
                return Err(MacNatError::NotUnicast { field, mac });
            }
        }
        if e.local == e.global {
            return Err(MacNatError::SameMac(e.local));
        }
        if e.port > super::ipv4map::MAX_PORT {
            return Err(MacNatError::BadPort(e.port));
        }
        let ip: IpAddr = e.ip.into();
        if ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
        {
            return Err(MacNatError::BadIp(ip));
        }
        if let Some((b, _)) = self.by_local.get(&e.local) {
            if b.global != e.global {
                return Err(MacNatError::LocalMacConflict {
                    local: e.local,
                    existing: b.global,
                });
            }
        }
        let binding = Binding {
            local: e.local,
            global: e.global,
            port: e.port,
        };
        let old = match e.ip {
            IpKey::V4(a) => self.v4.insert(u32::from_be_bytes(a), binding),
            IpKey::V6(a) => self.v6.insert(u128::from_be_bytes(a), binding),
        };
        if let Some(old) = old {
            self.unref_local(old.local);
        }
        self.by_local
            .entry(e.local)
            .and_modify(|(b, n)| {
                *b = binding;
                *n += 1;
            })
            .or_insert((binding, 1));
        Ok(())
    }

    fn unref_local(&mut self, local: MacAddr) {
        if let Some((_, n)) = self.by_local.get_mut(&local) {
            *n -= 1;
            if *n == 0 {
                self.by_local.remove(&local);
            }
        }
    }

    /// Removes the entry for `ip` (the data path forgets it after [`MacNatVersion::reindex`]).
    pub(crate) fn remove(&mut self, ip: IpKey) -> Result<MacNatEntry, MacNatError> {
        let old = match ip {
            IpKey::V4(a) => self.v4.remove(&u32::from_be_bytes(a)),
            IpKey::V6(a) => self.v6.remove(&u128::from_be_bytes(a)),
        };
        let b = old.ok_or(MacNatError::NotFound(ip.into()))?;
        self.unref_local(b.local);
        Ok(MacNatEntry {
            ip,
            local: b.local,
            global: b.global,
            port: b.port,
        })
    }

    /// All entries, sorted by IP (IPv4 first) for stable paging.
    pub fn entries(&self) -> Vec<MacNatEntry> {
        let mut v: Vec<MacNatEntry> = self
            .v4
            .iter()
            .map(|(k, b)| MacNatEntry {
                ip: IpKey::V4(k.to_be_bytes()),
                local: b.local,
                global: b.global,
                port: b.port,
            })
            .chain(self.v6.iter().map(|(k, b)| MacNatEntry {
                ip: IpKey::V6(k.to_be_bytes()),
                local: b.local,
                global: b.global,
                port: b.port,
            }))
            .collect();
        v.sort_by_key(|e| match e.ip {
            IpKey::V4(a) => (0u8, u128::from(u32::from_be_bytes(a))),
            IpKey::V6(a) => (1u8, u128::from_be_bytes(a)),
        });
        v
    }
}

/// The shared table: lock-free reads for net lcores, copy-and-swap writes for the control plane.
#[derive(Clone)]
pub struct MacNatTable {
    rcu: Rcu<MacNatVersion>,
}

/// A net lcore's read handle.
pub type MacNatReader = RcuReader<MacNatVersion>;

impl MacNatTable {
    /// A table with `entries`, readable by up to `max_readers` lcores.
    pub fn new(entries: &[MacNatEntry], max_readers: usize) -> Result<Self, MacNatError> {
        Ok(MacNatTable {
            rcu: Rcu::new(MacNatVersion::from_entries(entries)?, max_readers),
        })
    }

    /// The read handle for lcore slot `slot`.
    pub fn reader(&self, slot: usize) -> Option<MacNatReader> {
        self.rcu.reader(slot)
    }

    /// Adds (or replaces) entries atomically: all or none. Returns once no lcore can see the
    /// previous version.
    pub fn add(&self, entries: &[MacNatEntry]) -> Result<(), MacNatError> {
        self.rcu.update(|cur| {
            let mut next = cur.clone();
            for e in entries {
                next.insert(*e)?;
            }
            next.reindex();
            Ok((next, ()))
        })
    }

    /// Deletes entries atomically: all or none. When this returns, no lcore translates them.
    pub fn delete(&self, ips: &[IpKey]) -> Result<Vec<MacNatEntry>, MacNatError> {
        self.rcu.update(|cur| {
            let mut next = cur.clone();
            let removed = ips
                .iter()
                .map(|ip| next.remove(*ip))
                .collect::<Result<Vec<_>, _>>()?;
            next.reindex();
            Ok((next, removed))
        })
    }

    /// A page of entries (sorted by IP) and the total count.
    pub fn list(&self, offset: usize, limit: usize) -> (Vec<MacNatEntry>, usize) {
        self.rcu.with(|t| {
            let all = t.entries();
            let total = all.len();
            (all.into_iter().skip(offset).take(limit).collect(), total)
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.rcu.with(|t| t.len())
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::ipv4map::MAX_PORT;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, last])
    }
    fn gmac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }
    fn e4(ip: [u8; 4], l: u8, g: u8) -> MacNatEntry {
        MacNatEntry {
            ip: IpKey::V4(ip),
            local: mac(l),
            global: gmac(g),
            port: 1,
        }
    }

    #[test]
    fn add_lookup_delete() {
        let t = MacNatTable::new(&[e4([10, 0, 0, 2], 2, 1)], 1).unwrap();
        let mut r = t.reader(0).unwrap();
        r.online();
        assert_eq!(
            r.get().lookup(IpKey::V4([10, 0, 0, 2])).unwrap().global,
            gmac(1)
        );
        assert_eq!(r.get().lookup_local_mac(mac(2)).unwrap().global, gmac(1));
        r.quiescent();
        r.offline();
        t.add(&[e4([10, 0, 0, 3], 3, 1)]).unwrap();
        assert_eq!(t.len(), 2);
        t.delete(&[IpKey::V4([10, 0, 0, 2])]).unwrap();
        r.online();
        assert!(r.get().lookup(IpKey::V4([10, 0, 0, 2])).is_none());
        assert!(
            r.get().lookup_local_mac(mac(2)).is_none(),
            "local MAC index must follow deletes"
        );
        assert!(r.get().lookup_local_mac(mac(3)).is_some());
    }

    /// The data path keeps ports in a byte: a larger port id is refused with a message naming
    /// the field, and the largest one it keeps is found on that port.
    #[test]
    fn port_ids_beyond_a_byte_are_refused() {
        let t = MacNatTable::new(&[], 1).unwrap();
        let on = |port| MacNatEntry {
            port,
            ..e4([10, 0, 0, 2], 2, 1)
        };
        let err = t.add(&[on(MAX_PORT + 1)]).unwrap_err();
        assert!(matches!(err, MacNatError::BadPort(p) if p == MAX_PORT + 1));
        assert!(err.to_string().starts_with("port: "), "{err}");
        assert_eq!(t.len(), 0);
        t.add(&[on(MAX_PORT)]).unwrap();
        let mut r = t.reader(0).unwrap();
        r.online();
        assert_eq!(
            r.get().lookup(IpKey::V4([10, 0, 0, 2])).unwrap().port,
            MAX_PORT
        );
        r.offline();
    }

    #[test]
    fn refuses_bad_entries_atomically() {
        let t = MacNatTable::new(&[], 1).unwrap();
        let bad = [
            e4([10, 0, 0, 2], 2, 1),
            MacNatEntry {
                ip: IpKey::V4([10, 0, 0, 9]),
                local: MacAddr([0xff; 6]),
                global: gmac(1),
                port: 1,
            },
        ];
        assert!(matches!(
            t.add(&bad),
            Err(MacNatError::NotUnicast {
                field: "local_mac",
                ..
            })
        ));
        assert_eq!(t.len(), 0, "a failed batch must change nothing");
        assert!(matches!(
            t.add(&[e4([224, 0, 0, 1], 2, 1)]),
            Err(MacNatError::BadIp(_))
        ));
        assert!(matches!(
            t.add(&[e4([0, 0, 0, 0], 2, 1)]),
            Err(MacNatError::BadIp(_))
        ));
        t.add(&[e4([10, 0, 0, 2], 2, 1)]).unwrap();
        assert!(matches!(
            t.add(&[e4([10, 0, 0, 3], 2, 7)]),
            Err(MacNatError::LocalMacConflict { .. })
        ));
        assert!(matches!(
            t.delete(&[IpKey::V4([1, 1, 1, 1])]),
            Err(MacNatError::NotFound(_))
        ));
    }

    #[test]
    fn shared_global_macs_and_paging() {
        let t = MacNatTable::new(&[], 1).unwrap();
        let entries: Vec<_> = (0..100u8).map(|i| e4([10, 0, 1, i], i + 1, 1)).collect();
        t.add(&entries).unwrap();
        let (page, total) = t.list(90, 20);
        assert_eq!(total, 100);
        assert_eq!(page.len(), 10);
        assert_eq!(page[0].ip, IpKey::V4([10, 0, 1, 90]));
    }
}
