//! Typed message rings between lcores, over `rte_ring`.
//!
//! A ring carries `Box<T>` pointers: the sender gives up the box on enqueue and the receiver
//! owns it on dequeue. Single-producer/single-consumer rings hand out one non-`Clone`
//! [`Producer`]/[`Consumer`] pair, so the SP/SC contract is enforced by the type system;
//! multi-producer/multi-consumer rings hand out cloneable ones.

use super::{last_errno, strerror, EnvError};
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

const RING_F_SP_ENQ: u32 = 0x0001;
const RING_F_SC_DEQ: u32 = 0x0002;
const RING_F_EXACT_SZ: u32 = 0x0004;

struct RawRing<T> {
    ring: NonNull<dpdk_sys::rte_ring>,
    _owns: PhantomData<T>,
}

// SAFETY: rte_ring is safe for concurrent enqueue/dequeue within its sync mode; the SP/SC
// restriction is enforced by the handle types. T: Send because values cross threads.
unsafe impl<T: Send> Send for RawRing<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for RawRing<T> {}

impl<T> Drop for RawRing<T> {
    fn drop(&mut self) {
        // Last handle gone: nobody else can touch the ring. Free queued messages, then the ring.
        let mut obj: *mut c_void = std::ptr::null_mut();
        // SAFETY: ring is valid; each dequeued pointer is a Box<T> leaked by enqueue.
        while unsafe { dpdk_sys::hp_ring_dequeue(self.ring.as_ptr(), &mut obj) } == 0 {
            // SAFETY: see above: we own the dequeued box.
            drop(unsafe { Box::from_raw(obj.cast::<T>()) });
        }
        // SAFETY: no handle remains, so no concurrent user.
        unsafe { dpdk_sys::rte_ring_free(self.ring.as_ptr()) };
    }
}

/// Sending side of a ring.
pub struct Producer<T> {
    ring: Arc<RawRing<T>>,
    multi: bool,
    // Not Sync: two threads sharing one SP producer would break the single-producer contract.
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

/// Receiving side of a ring.
pub struct Consumer<T> {
    ring: Arc<RawRing<T>>,
    multi: bool,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

fn create<T>(name: &str, capacity: u32, flags: u32) -> Result<Arc<RawRing<T>>, EnvError> {
    let cname = CString::new(name).map_err(|_| EnvError::BadArgument(name.into()))?;
    let r =
        // SAFETY: valid name; socket -1 = any. EXACT_SZ makes `capacity` usable slots.
        unsafe { dpdk_sys::rte_ring_create(cname.as_ptr(), capacity, -1, flags | RING_F_EXACT_SZ) };
    let ring = NonNull::new(r).ok_or_else(|| EnvError::Create {
        what: "ring",
        name: name.into(),
        reason: strerror(last_errno()),
    })?;
    Ok(Arc::new(RawRing {
        ring,
        _owns: PhantomData,
    }))
}

fn handles<T>(
    r: Arc<RawRing<T>>,
    multi_producer: bool,
    multi_consumer: bool,
) -> (Producer<T>, Consumer<T>) {
    (
        Producer {
            ring: r.clone(),
            multi: multi_producer,
            _not_sync: PhantomData,
        },
        Consumer {
            ring: r,
            multi: multi_consumer,
            _not_sync: PhantomData,
        },
    )
}

/// A single-producer, single-consumer ring of `capacity` messages. `name` must be unique.
pub fn spsc<T: Send>(name: &str, capacity: u32) -> Result<(Producer<T>, Consumer<T>), EnvError> {
    Ok(handles(
        create::<T>(name, capacity, RING_F_SP_ENQ | RING_F_SC_DEQ)?,
        false,
        false,
    ))
}

/// A multi-producer, multi-consumer ring; both handles can be cloned.
pub fn mpmc<T: Send>(name: &str, capacity: u32) -> Result<(Producer<T>, Consumer<T>), EnvError> {
    Ok(handles(create::<T>(name, capacity, 0)?, true, true))
}

/// A multi-producer, single-consumer ring (the reactor message queue shape).
pub fn mpsc<T: Send>(name: &str, capacity: u32) -> Result<(Producer<T>, Consumer<T>), EnvError> {
    Ok(handles(
        create::<T>(name, capacity, RING_F_SC_DEQ)?,
        true,
        false,
    ))
}

impl<T: Send> Producer<T> {
    /// Enqueues a message; gives it back when the ring is full.
    pub fn send(&self, msg: T) -> Result<(), T> {
        self.send_box(Box::new(msg)).map_err(|b| *b)
    }

    /// Enqueues a boxed message without reboxing.
    pub fn send_box(&self, msg: Box<T>) -> Result<(), Box<T>> {
        let p = Box::into_raw(msg);
        // SAFETY: ring valid; on success the consumer takes ownership of the box.
        if unsafe { dpdk_sys::hp_ring_enqueue(self.ring.ring.as_ptr(), p.cast()) } == 0 {
            Ok(())
        } else {
            // SAFETY: enqueue failed, the pointer was not stored: we still own it.
            Err(unsafe { Box::from_raw(p) })
        }
    }

    /// Whether this producer may be cloned (multi-producer ring).
    pub fn try_clone(&self) -> Option<Producer<T>> {
        self.multi.then(|| Producer {
            ring: self.ring.clone(),
            multi: true,
            _not_sync: PhantomData,
        })
    }
}

impl<T: Send> Consumer<T> {
    /// Dequeues one message, if any.
    pub fn recv(&self) -> Option<T> {
        self.recv_box().map(|b| *b)
    }

    /// Dequeues one boxed message, if any.
    pub fn recv_box(&self) -> Option<Box<T>> {
        let mut obj: *mut c_void = std::ptr::null_mut();
        // SAFETY: ring valid; a dequeued pointer is a Box<T> given up by a producer.
        if unsafe { dpdk_sys::hp_ring_dequeue(self.ring.ring.as_ptr(), &mut obj) } == 0 {
            // SAFETY: see above; we are now its only owner.
            Some(unsafe { Box::from_raw(obj.cast::<T>()) })
        } else {
            None
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        // SAFETY: ring valid; the count is a snapshot.
        unsafe { dpdk_sys::hp_ring_count(self.ring.ring.as_ptr()) as usize }
    }

    /// True when no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this consumer may be cloned (multi-consumer ring).
    pub fn try_clone(&self) -> Option<Consumer<T>> {
        self.multi.then(|| Consumer {
            ring: self.ring.clone(),
            multi: true,
            _not_sync: PhantomData,
        })
    }
}
