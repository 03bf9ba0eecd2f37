//! The data path's IPv4 → binding map: open addressing over 64-byte buckets of three entries,
//! so a lookup touches one cache line (two on overflow), and the line can be prefetched for a
//! whole burst before any frame of it is processed (DPDK l3fwd's bulk-lookup idea).
//!
//! The map is immutable once built: [`super::macnat::MacNatVersion`] rebuilds it after every
//! control-plane change (readers see whole versions through RCU), so it needs no deletion or
//! tombstones. Key 0 (0.0.0.0) marks an empty slot; it is never a valid VM address.

use super::macnat::Binding;
use super::packet::MacAddr;

const SLOTS: usize = 3;
/// The largest port id the map can hold: slots keep `port + 1` in a byte, 0 marking an empty
/// slot, and [`port_tag`] keeps 255 for ports beyond this.
pub const MAX_PORT: u16 = 253;

/// What a slot holding port `port` keeps: `port + 1`; 255 for a port beyond [`MAX_PORT`], which
/// no slot holds. Never 0, the empty slot's.
#[inline(always)]
pub fn port_tag(port: u16) -> u8 {
    if port <= MAX_PORT {
        port as u8 + 1
    } else {
        u8::MAX
    }
}
/// Keep buckets at most this full (in slots out of 3) on average.
const LOAD_NUM: usize = 2;

/// The IPv4 ethertype as it follows the source MAC in a frame.
const IPV4_ETHERTYPE: [u8; 2] = [0x08, 0x00];

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Bucket {
    keys: [u32; SLOTS],
    /// Per slot: [`port_tag`] of the VM-side port; 0 in an empty slot.
    ports: [u8; SLOTS],
    _pad: u8,
    /// Per slot: the local MAC and the IPv4 ethertype, the 8 bytes at offset 6 of an untagged
    /// IPv4 frame from the VM (so one 8-byte compare checks both).
    local: [[u8; 8]; SLOTS],
    /// Per slot: the global MAC and the IPv4 ethertype, what egress writes at offset 6.
    global: [[u8; 8]; SLOTS],
}

/// A MAC followed by the IPv4 ethertype.
fn mac_word(mac: [u8; 6]) -> [u8; 8] {
    let mut w = [0u8; 8];
    w[..6].copy_from_slice(&mac);
    w[6..].copy_from_slice(&IPV4_ETHERTYPE);
    w
}

/// The MAC of a [`mac_word`].
#[inline(always)]
fn word_mac(w: &[u8; 8]) -> [u8; 6] {
    let [a, b, c, d, e, f, _, _] = *w;
    [a, b, c, d, e, f]
}

/// Bucket arrays up to 256 KiB count as cache-resident.
const CACHE_RESIDENT_BUCKETS: usize = (256 << 10) / 64;

/// Tables at least this big are mapped 2 MiB aligned and advised to use transparent huge pages: a
/// million entries span 32 MiB, and with 4 KiB pages nearly every lookup would also miss the TLB.
const HUGE: usize = 2 << 20;

/// A zero-filled anonymous mapping of at least `len` bytes, 2 MiB aligned and advised to use
/// transparent huge pages before the first touch; unmapped on drop. The MAC-NAT bucket array
/// lives in one (and `bench macnat`'s memory probe, to measure the same kind of memory).
pub struct HugeZeroed {
    base: *mut libc::c_void,
    total: usize,
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: HugeZeroed exclusively owns its mapping; it hands out no references by itself.
unsafe impl Send for HugeZeroed {}
// SAFETY: as above; &HugeZeroed only exposes the address and length.
unsafe impl Sync for HugeZeroed {}

impl HugeZeroed {
    /// Maps `len` bytes (plus alignment slack); None if mmap fails or `len` is 0.
    pub fn new(len: usize) -> Option<HugeZeroed> {
        let total = len.checked_add(HUGE)?;
        if len == 0 {
            return None;
        }
        // SAFETY: anonymous private mapping; no fd, no fixed address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let aligned = (base as usize + HUGE - 1) & !(HUGE - 1);
        // SAFETY: advises on memory we just mapped and have not touched; failure (THP
        // disabled) only costs speed.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        let Some(ptr) = std::ptr::NonNull::new(aligned as *mut u8) else {
            // SAFETY: unmaps the mapping made above, never used.
            unsafe { libc::munmap(base, total) };
            return None;
        };
        Some(HugeZeroed {
            base,
            total,
            ptr,
            len,
        })
    }

    /// First byte (2 MiB aligned); `len` zero-filled bytes follow.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Usable length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (`new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HugeZeroed {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; whoever borrowed from it (the bucket
        // array, the probe's slice) is gone before its owner drops it.
        unsafe { libc::munmap(self.base, self.total) };
    }
}

/// Zeroed (= empty) bucket storage. Large tables live in a [`HugeZeroed`] mapping (fresh,
/// untouched pages on transparent huge pages); small ones come from the allocator.
struct Buckets {
    ptr: std::ptr::NonNull<Bucket>,
    len: usize,
    /// Our own mapping, or None when the allocator owns the memory.
    mapping: Option<HugeZeroed>,
}

// SAFETY: Buckets exclusively owns its allocation of plain-old-data buckets.
unsafe impl Send for Buckets {}
// SAFETY: shared access is read-only (no interior mutability).
unsafe impl Sync for Buckets {}

impl Buckets {
    fn small_layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::array::<Bucket>(len)
            .unwrap_or_else(|_| std::alloc::Layout::new::<Bucket>())
    }

    fn zeroed(len: usize) -> Buckets {
        let size = len * std::mem::size_of::<Bucket>();
        if size >= HUGE {
            if let Some(m) = HugeZeroed::new(size) {
                // 2 MiB alignment satisfies Bucket's 64.
                let ptr = m.ptr.cast::<Bucket>();
                return Buckets {
                    ptr,
                    len,
                    mapping: Some(m),
                };
            }
        }
        let layout = Self::small_layout(len);
        // SAFETY: len >= 2, so the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p.cast::<Bucket>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        Buckets {
            ptr,
            len,
            mapping: None,
        }
    }
}

impl std::ops::Deref for Buckets {
    type Target = [Bucket];
    fn deref(&self) -> &[Bucket] {
        // SAFETY: ptr is valid for len buckets, all initialised (zeroed bytes are a valid Bucket).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buckets {
    fn deref_mut(&mut self) -> &mut [Bucket] {
        // SAFETY: as in deref, with exclusive access through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for Buckets {
    fn clone(&self) -> Buckets {
        let mut b = Buckets::zeroed(self.len);
        b.copy_from_slice(self);
        b
    }
}

impl Drop for Buckets {
    fn drop(&mut self) {
        if self.mapping.is_none() {
            // SAFETY: allocated in `zeroed` with exactly this layout; nothing borrows it any more.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::small_layout(self.len)) }
        }
        // A mapping is unmapped by its own Drop.
    }
}

/// Bit `s` set when slot `s` of the bucket holds `key`.
#[inline(always)]
fn match_mask(b: &Bucket, key: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_castsi128_ps, _mm_cmpeq_epi32, _mm_load_si128, _mm_movemask_ps, _mm_set1_epi32,
        };
        // SAFETY: SSE2 is part of the x86_64 baseline. A Bucket is 64-byte aligned and 64 bytes
        // long, so the aligned 16-byte load stays inside it (the three keys, the ports and pad).
        unsafe {
            let v = _mm_load_si128((b as *const Bucket).cast());
            let eq = _mm_cmpeq_epi32(v, _mm_set1_epi32(key as i32));
            (_mm_movemask_ps(_mm_castsi128_ps(eq)) as u32) & ((1 << SLOTS) - 1)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let k = &b.keys;
        u32::from(k[0] == key) | (u32::from(k[1] == key) << 1) | (u32::from(k[2] == key) << 2)
    }
}

/// A present key's slot, borrowed from the map: what the data path reads after a hit, without
/// copying it out first.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    bucket: &'a Bucket,
    slot: usize,
}

impl<'a> Entry<'a> {
    /// The slot of `bucket` holding `key`, if one does.
    #[inline(always)]
    fn in_bucket(bucket: &'a Bucket, key: u32) -> Option<Entry<'a>> {
        let hit = match_mask(bucket, key);
        (hit != 0).then(|| Entry {
            bucket,
            slot: hit.trailing_zeros() as usize % SLOTS,
        })
    }

    /// The VM's local MAC.
    #[inline(always)]
    pub fn local(&self) -> [u8; 6] {
        word_mac(&self.bucket.local[self.slot])
    }

    /// The VM's global MAC.
    #[inline(always)]
    pub fn global(&self) -> [u8; 6] {
        word_mac(&self.bucket.global[self.slot])
    }

    /// The global MAC followed by the IPv4 ethertype: what an egress IPv4 frame gets at offset 6.
    #[inline(always)]
    pub fn global_ipv4_word(&self) -> &[u8; 8] {
        &self.bucket.global[self.slot]
    }

    /// The VM-side port.
    #[inline(always)]
    pub fn port(&self) -> u16 {
        u16::from(self.bucket.ports[self.slot]).wrapping_sub(1)
    }

    /// Whether the slot is for port `tag` ([`port_tag`]): never true of an empty slot, so a
    /// caller that checks this need not exclude key 0 (the empty slots' key) first.
    #[inline(always)]
    pub fn on_port(&self, tag: u8) -> bool {
        self.bucket.ports[self.slot] == tag
    }

    /// Are `frame_word` (the 8 bytes at offset 6 of a frame) the local MAC followed by the IPv4
    /// ethertype? One 8-byte compare for the source MAC and the ethertype.
    #[inline(always)]
    pub fn local_ipv4_matches(&self, frame_word: [u8; 8]) -> bool {
        u64::from_ne_bytes(frame_word) == u64::from_ne_bytes(self.bucket.local[self.slot])
    }

    /// The whole binding, copied out.
    #[inline(always)]
    pub fn binding(&self) -> Binding {
        Binding {
            local: MacAddr(self.local()),
            global: MacAddr(self.global()),
            port: self.port(),
        }
    }
}

/// An immutable IPv4 (host order) → [`Binding`] map.
#[derive(Clone)]
pub struct Ipv4BindingMap {
    buckets: Buckets,
    /// Bucket count minus one (a power of two minus one).
    mask: usize,
    /// `mask` in bytes: home bucket offsets are `hash & off_mask`.
    off_mask: usize,
    /// Shifts the top bits of the 64-bit hash product into bucket-offset position.
    shift: u32,
    mult: u64,
    /// Longest probe sequence (in buckets) any present key needs; misses stop there.
    max_probe: usize,
    len: usize,
}

impl Default for Ipv4BindingMap {
    fn default() -> Self {
        Self::build(std::iter::empty(), 0)
    }
}

impl Ipv4BindingMap {
    /// Builds a map from (key, binding) pairs; keys must be unique and non-zero.
    pub fn build(items: impl Iterator<Item = (u32, Binding)>, n: usize) -> Self {
        // Tables whose buckets fit in cache even at a third full are built that sparse: one
        // entry per bucket on average instead of two, so fewer keys overflow their home bucket
        // (1.7 % of a dense range of 1 000 addresses at two thirds full, each then probing a
        // second bucket out of line).
        let dense = (n * SLOTS / LOAD_NUM / SLOTS).max(1);
        let sparse = n.max(1);
        let want = if sparse.next_power_of_two() <= CACHE_RESIDENT_BUCKETS {
            sparse
        } else {
            dense
        };
        let nb = want.next_power_of_two().max(2);
        let mut m = Ipv4BindingMap {
            buckets: Buckets::zeroed(nb),
            mask: nb - 1,
            off_mask: (nb - 1) * std::mem::size_of::<Bucket>(),
            // The product's top log2(nb) bits pick the bucket (a multiplicative hash's best
            // bits), landing 6 bits up, as a byte offset.
            shift: 64 - nb.trailing_zeros() - std::mem::size_of::<Bucket>().trailing_zeros(),
            // An odd multiplier per build: spreads structured address ranges (10.0.0.1,
            // 10.0.0.2, ...) over buckets; varying it keeps one table's layout from being
            // assumed by traffic crafted against another.
            mult: 0x9e37_79b9_7f4a_7c15 ^ ((nb as u64) << 1),
            max_probe: 0,
            len: 0,
        };
        for (k, b) in items {
            m.insert(k, b);
        }
        m
    }

    /// Where the key's probe sequence starts: the byte offset of its home bucket in the bucket
    /// array (an offset, not an index, saves the lookup a shift). Pass it to [`Self::find`] and
    /// [`Self::prefetch_home`], so a burst hashes each key once.
    #[inline(always)]
    pub fn home(&self, key: u32) -> usize {
        ((u64::from(key).wrapping_mul(self.mult) >> self.shift) as usize) & self.off_mask
    }

    fn insert(&mut self, key: u32, b: Binding) {
        debug_assert!(key != 0);
        // Ports are kept in a byte: MacNatVersion refuses entries with larger port ids (DPDK has
        // at most RTE_MAX_ETHPORTS ports, 32 in Debian's build).
        debug_assert!(b.port <= MAX_PORT);
        let port = port_tag(b.port);
        if self.len + 1 > self.buckets.len() * LOAD_NUM {
            // Callers size the map from the item count; grow if that was an underestimate.
            let items: Vec<(u32, Binding)> = self.iter().collect();
            *self = Self::build(items.into_iter(), (self.len + 1) * 2);
        }
        let mut i = self.home(key) / std::mem::size_of::<Bucket>();
        let mut probe = 0;
        loop {
            let bucket = &mut self.buckets[i];
            for s in 0..SLOTS {
                if bucket.keys[s] == 0 || bucket.keys[s] == key {
                    if bucket.keys[s] == 0 {
                        self.len += 1;
                    }
                    bucket.keys[s] = key;
                    bucket.ports[s] = port;
                    bucket.local[s] = mac_word(b.local.0);
                    bucket.global[s] = mac_word(b.global.0);
                    self.max_probe = self.max_probe.max(probe);
                    return;
                }
            }
            i = (i + 1) & self.mask;
            probe += 1;
        }
    }

    /// Small enough to stay in a core's cache (256 KiB of buckets, about 8 k entries): lookups
    /// then gain nothing from a prefetch pass over the burst.
    #[inline(always)]
    pub fn cache_resident(&self) -> bool {
        self.mask < CACHE_RESIDENT_BUCKETS
    }

    /// Looks a key up.
    #[inline(always)]
    pub fn get(&self, key: u32) -> Option<Binding> {
        if key == 0 {
            return None;
        }
        self.find(key, self.home(key)).map(|e| e.binding())
    }

    /// Looks a key up from its [`Self::home`] bucket.
    ///
    /// Key 0 marks empty slots and is never stored: looking it up may find an empty slot,
    /// which [`Entry::on_port`] tells apart. Callers that do not check the port must not look
    /// up 0.
    ///
    /// Branch-light: one SSE2 compare of the key against a bucket's three keys and a
    /// `trailing_zeros` of the match mask pick the slot — which slot holds a key is random, so a
    /// branch per slot mispredicts on about every other frame.
    #[inline(always)]
    pub fn find(&self, key: u32, home: usize) -> Option<Entry<'_>> {
        let off = home & self.off_mask;
        // SAFETY: `off_mask` is (bucket count - 1) * bucket size with a power-of-two count, so
        // `off` is the offset of a bucket inside the array.
        let bucket = unsafe { &*self.buckets.ptr.as_ptr().byte_add(off) };
        if let Some(e) = Entry::in_bucket(bucket, key) {
            return Some(e);
        }
        // Slots fill in order and nothing is ever deleted: a free slot ends the search.
        if bucket.keys[SLOTS - 1] == 0 || self.max_probe == 0 {
            return None;
        }
        self.find_overflow(key, off / std::mem::size_of::<Bucket>())
    }

    /// The rest of a probe sequence whose home bucket `i` is full and did not hold the key.
    #[inline(never)]
    fn find_overflow(&self, key: u32, mut i: usize) -> Option<Entry<'_>> {
        for _ in 0..self.max_probe {
            i = (i + 1) & self.mask;
            let bucket = &self.buckets[i];
            if let Some(e) = Entry::in_bucket(bucket, key) {
                return Some(e);
            }
            if bucket.keys[SLOTS - 1] == 0 {
                return None;
            }
        }
        None
    }

    /// Starts loading a [`Self::home`] bucket into cache.
    #[inline(always)]
    pub fn prefetch_home(&self, home: usize) {
        let p = self
            .buckets
            .ptr
            .as_ptr()
            .wrapping_byte_add(home & self.off_mask);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetch is a hint that never faults; `p` points into our bucket array anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = (u32, Binding)> + '_ {
        self.buckets.iter().flat_map(|b| {
            (0..SLOTS)
                .filter(move |s| b.keys[*s] != 0)
                .map(move |slot| (b.keys[slot], Entry { bucket: b, slot }.binding()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn binding(i: u32) -> Binding {
        let b = i.to_be_bytes();
        Binding {
            local: MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]]),
            global: MacAddr([2, 0, b[0], b[1], b[2], b[3]]),
            port: (i % 7) as u16,
        }
    }

    /// A million-entry table (32 MiB of buckets) is backed by transparent huge pages when the
    /// kernel allows them (`madvise` or `always`): with 4 KiB pages nearly every lookup would
    /// also miss the TLB.
    #[test]
    fn large_tables_get_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if mode.contains("[never]") || mode.is_empty() {
            return println!("skipped: transparent huge pages are off ({mode:?})");
        }
        let m = Ipv4BindingMap::build((1..=1_000_000u32).map(|i| (i, binding(i))), 1_000_000);
        let base = m.buckets.as_ptr() as usize;
        let size = m.buckets.len() * std::mem::size_of::<Bucket>();
        assert_eq!(base % HUGE, 0, "bucket array not 2 MiB aligned");
        // Sum AnonHugePages over the mappings inside the bucket array.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut inside, mut huge_kb) = (false, 0u64);
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a < base + size && b > base;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = l.strip_prefix("AnonHugePages:") {
                    huge_kb += v.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0);
                }
            }
        }
        assert!(
            huge_kb * 1024 >= size as u64 / 2,
            "only {huge_kb} kB of the {size}-byte bucket array is on huge pages"
        );
        assert_eq!(m.get(777_777).map(|b| b.port), Some(binding(777_777).port));
    }

    #[test]
    fn bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
    }

    #[test]
    fn dense_ranges_and_misses() {
        let keys: Vec<u32> = (1..=100_000u32).map(|i| 0x0a00_0000 + i).collect();
        let m = Ipv4BindingMap::build(keys.iter().map(|k| (*k, binding(*k))), keys.len());
        assert_eq!(m.len(), keys.len());
        for k in &keys {
            assert_eq!(m.get(*k), Some(binding(*k)));
        }
        for k in 0x0b00_0000..0x0b00_1000u32 {
            assert_eq!(m.get(k), None);
        }
        assert!(m.max_probe < 16, "probe chains too long: {}", m.max_probe);
        assert_eq!(Ipv4BindingMap::default().get(1), None);
    }

    /// The data path keys addresses in frame byte order (see `MacNatVersion`): a dense range
    /// then varies in the key's top byte first. The hash must still spread it: nearly every key
    /// in its home bucket, short probe chains.
    #[test]
    fn dense_frame_order_ranges_spread() {
        for n in [1_000u32, 1_000_000] {
            let keys: Vec<u32> = (1..=n)
                .map(|i| u32::from_ne_bytes((0x0a00_0000 + i).to_be_bytes()))
                .collect();
            let m = Ipv4BindingMap::build(keys.iter().map(|k| (*k, binding(*k))), keys.len());
            let away = keys
                .iter()
                .filter(|k| {
                    let home = &m.buckets[m.home(**k) / std::mem::size_of::<Bucket>()];
                    !home.keys.contains(k)
                })
                .count();
            println!(
                "{n} keys: {away} outside their home bucket, longest probe {}",
                m.max_probe
            );
            // Small tables are built a third full (none away for this range), big ones two
            // thirds.
            let most = if n <= 1_000 { 100 } else { 20 };
            assert!(
                away * most <= keys.len(),
                "{away} of {n} keys outside their home bucket"
            );
            assert!(m.max_probe <= 4, "probe chains too long: {}", m.max_probe);
        }
    }

    proptest! {
        #[test]
        fn agrees_with_hashmap(keys in proptest::collection::hash_set(1u32.., 0..2000), probes in proptest::collection::vec(any::<u32>(), 0..200), underestimate in 0usize..4) {
            let reference: HashMap<u32, Binding> = keys.iter().map(|k| (*k, binding(*k))).collect();
            // An underestimated size hint must still work (the map grows).
            let m = Ipv4BindingMap::build(reference.iter().map(|(k, b)| (*k, *b)), reference.len() / (underestimate + 1));
            prop_assert_eq!(m.len(), reference.len());
            for (k, b) in &reference {
                prop_assert_eq!(m.get(*k), Some(*b));
            }
            for p in probes {
                prop_assert_eq!(m.get(p), reference.get(&p).copied());
            }
        }
    }
}
