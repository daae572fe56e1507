//! Heap accounting of the engine threads. boa has no allocation hook and no heap-size figure,
//! so the process allocator counts, for each engine thread, the bytes it allocated minus the
//! bytes it freed. The watchdog reads that figure while a job runs.
//!
//! What this measures and what it does not: memory allocated on one thread and freed on
//! another moves the figure (a batch's input built by the async side and freed by the engine
//! lowers it; results handed back raise it until the next job's baseline), so it is an
//! estimate of the engine's heap, exact for what the script itself allocates while a job runs.
//! Other threads pay one thread-local read per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};

/// The counters of one engine thread; leaked, so the allocator and the watchdog can hold them
/// without reference counts (a few dozen bytes per engine thread ever started).
#[derive(Debug, Default)]
pub(super) struct ThreadMem {
    /// Bytes allocated minus bytes freed on the thread since it started counting.
    pub live: AtomicI64,
}

thread_local! {
    static TRACKED: Cell<Option<&'static ThreadMem>> = const { Cell::new(None) };
}

/// Starts counting the calling thread's allocations.
pub(super) fn track_this_thread() -> &'static ThreadMem {
    let mem: &'static ThreadMem = Box::leak(Box::default());
    TRACKED.with(|t| t.set(Some(mem)));
    mem
}

/// Stops counting the calling thread's allocations.
pub(super) fn untrack_this_thread() {
    let _ = TRACKED.try_with(|t| t.set(None));
}

#[inline]
fn count(delta: i64) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = TRACKED.try_with(|t| {
        if let Some(m) = t.get() {
            m.live.fetch_add(delta, Ordering::Relaxed);
        }
    });
}

/// The system allocator, counting engine threads' bytes.
pub(super) struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counting touches no memory the
// caller owns.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracked_thread_counts_what_it_allocates_and_frees() {
        std::thread::spawn(|| {
            let mem = track_this_thread();
            let before = mem.live.load(Ordering::Relaxed);
            let v = vec![0u8; 10 << 20];
            let grown = mem.live.load(Ordering::Relaxed) - before;
            assert!(grown >= 10 << 20, "{grown}");
            drop(v);
            let after = mem.live.load(Ordering::Relaxed) - before;
            assert!(after < 1 << 20, "{after}");
            untrack_this_thread();
            let _w = vec![0u8; 10 << 20];
            assert_eq!(mem.live.load(Ordering::Relaxed) - before, after);
        })
        .join()
        .unwrap();
    }
}
