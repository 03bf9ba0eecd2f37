//! Read-copy-update with quiescent-state-based reclamation (QSBR), for tables that net lcores
//! read on every burst and the control plane replaces now and then.
//!
//! Readers never block and take no lock: a reader loads the current pointer, uses it for one
//! burst, then reports a quiescent state. A writer publishes a new version with one atomic swap
//! and frees the old version only after every online reader has reported a quiescent state since
//! the swap (so none can still hold the old pointer).

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One reader's counter on its own cache line. 0 = offline (holds no pointer).
#[repr(align(64))]
struct ReaderSlot(AtomicU64);

struct Inner<T> {
    current: AtomicPtr<T>,
    readers: Box<[ReaderSlot]>,
    writer: Mutex<()>,
}

/// An RCU-protected value shared by a fixed set of readers and any number of writers.
pub struct Rcu<T: Send + Sync + 'static> {
    inner: Arc<Inner<T>>,
}

impl<T: Send + Sync + 'static> Clone for Rcu<T> {
    fn clone(&self) -> Self {
        Rcu {
            inner: self.inner.clone(),
        }
    }
}

/// A reader's handle: one per polling thread.
pub struct RcuReader<T: Send + Sync + 'static> {
    inner: Arc<Inner<T>>,
    slot: usize,
    counter: u64,
}

impl<T: Send + Sync + 'static> Rcu<T> {
    /// Wraps `value`, with room for `max_readers` reader handles.
    pub fn new(value: T, max_readers: usize) -> Self {
        let readers = (0..max_readers)
            .map(|_| ReaderSlot(AtomicU64::new(0)))
            .collect();
        Rcu {
            inner: Arc::new(Inner {
                current: AtomicPtr::new(Box::into_raw(Box::new(value))),
                readers,
                writer: Mutex::new(()),
            }),
        }
    }

    /// The reader handle for slot `slot` (each slot used by one thread). `None` when out of range.
    pub fn reader(&self, slot: usize) -> Option<RcuReader<T>> {
        (slot < self.inner.readers.len()).then(|| RcuReader {
            inner: self.inner.clone(),
            slot,
            counter: 0,
        })
    }

    /// Runs `f` on the current value from a control thread (writers are serialised, so the value
    /// cannot be freed while `f` runs).
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let _w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: only writers free old versions, and they hold the writer lock we hold now.
        f(unsafe { &*self.inner.current.load(Ordering::Acquire) })
    }

    /// Builds a new version from the current one with `f` and publishes it; returns `f`'s result
    /// after every reader has left the old version, which is then freed. If `f` fails, nothing
    /// changes.
    pub fn update<R, E>(&self, f: impl FnOnce(&T) -> Result<(T, R), E>) -> Result<R, E> {
        let _w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.inner.current.load(Ordering::Acquire);
        // SAFETY: `old` is the live version; only writers free versions and we are the writer.
        let (new, r) = f(unsafe { &*old })?;
        self.inner
            .current
            .store(Box::into_raw(Box::new(new)), Ordering::Release);
        self.synchronize();
        // SAFETY: after synchronize() no reader holds `old` (each online reader has passed a
        // quiescent state after the store), and no other writer can see it.
        drop(unsafe { Box::from_raw(old) });
        Ok(r)
    }

    /// Waits until every online reader has reported a quiescent state (or gone offline).
    fn synchronize(&self) {
        let snap: Vec<u64> = self
            .inner
            .readers
            .iter()
            .map(|r| r.0.load(Ordering::SeqCst))
            .collect();
        for (slot, seen) in self.inner.readers.iter().zip(snap) {
            if seen == 0 {
                continue;
            }
            let mut spins = 0u32;
            loop {
                let now = slot.0.load(Ordering::SeqCst);
                if now != seen {
                    break;
                }
                spins += 1;
                if spins < 1000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
}

impl<T: Send + Sync + 'static> RcuReader<T> {
    /// Marks this reader online; call before the first [`RcuReader::get`].
    pub fn online(&mut self) {
        self.quiescent();
    }

    /// The current version, going online first if needed. The borrow on `self` keeps it valid
    /// until the next [`RcuReader::quiescent`] or [`RcuReader::offline`].
    #[inline(always)]
    pub fn get(&mut self) -> &T {
        if self.counter == 0 || self.inner.readers[self.slot].0.load(Ordering::Relaxed) == 0 {
            self.quiescent();
            // Going online must be visible before the pointer is loaded, or a writer could
            // miss this reader and free the version we are about to load.
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        // SAFETY: this reader is online (its slot is non-zero, published with a SeqCst fence
        // before this load), so a writer that swaps the pointer after this load waits for this
        // reader's next quiescent state before freeing; that needs &mut self, which the
        // returned borrow prevents while it lives.
        unsafe { &*self.inner.current.load(Ordering::SeqCst) }
    }

    /// Reports that this reader holds no reference into any version.
    #[inline(always)]
    pub fn quiescent(&mut self) {
        self.counter = self.counter.wrapping_add(1).max(1);
        self.inner.readers[self.slot]
            .0
            .store(self.counter, Ordering::Release);
    }

    /// Takes this reader offline (e.g. while idle or stopping): writers stop waiting for it.
    pub fn offline(&mut self) {
        self.inner.readers[self.slot].0.store(0, Ordering::Release);
    }
}

impl<T: Send + Sync + 'static> Drop for RcuReader<T> {
    fn drop(&mut self) {
        self.offline();
    }
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        // SAFETY: the last Rcu/RcuReader is gone, so nobody can hold the current version.
        drop(unsafe { Box::from_raw(*self.current.get_mut()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn readers_see_updates_and_old_versions_are_freed_after_quiescence() {
        struct Tracked(u64, Arc<AtomicU64>);
        impl Drop for Tracked {
            fn drop(&mut self) {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
        let freed = Arc::new(AtomicU64::new(0));
        let rcu = Rcu::new(Tracked(0, freed.clone()), 2);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for slot in 0..2 {
            let mut r = rcu.reader(slot).unwrap();
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                r.online();
                let mut last = 0;
                while !stop.load(Ordering::Relaxed) {
                    let v = r.get().0;
                    assert!(v >= last, "versions went backwards");
                    last = v;
                    r.quiescent();
                }
                last
            }));
        }
        for i in 1..=200u64 {
            let f = freed.clone();
            rcu.update(|_| Ok::<_, ()>((Tracked(i, f), ()))).unwrap();
            // Each update frees exactly the version it replaced, before returning.
            assert_eq!(freed.load(Ordering::SeqCst), i);
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            assert!(h.join().unwrap() <= 200);
        }
        assert_eq!(rcu.with(|t| t.0), 200);
    }

    #[test]
    fn offline_readers_do_not_block_writers() {
        let rcu = Rcu::new(1u32, 1);
        let mut r = rcu.reader(0).unwrap();
        r.online();
        r.offline();
        rcu.update(|v| Ok::<_, ()>((v + 1, ()))).unwrap();
        r.online();
        assert_eq!(*r.get(), 2);
        assert!(rcu.reader(1).is_none());
    }
}
