//! "No unbounded allocation on any input", measured: the test binary's allocator counts what each
//! thread has allocated, and [`assert_bounded`] fails a target whose decoding of one input ever
//! held more than [`bound`] bytes at once.
//!
//! Why a bound proportional to the input: every decoder is handed the whole message first (the
//! gateway caps packets at `max_packet_bytes`, the core caps payloads at `max_payload_bytes`), so
//! what it may allocate must follow from the input's length, never from a length field inside it.
//! serde caps what it preallocates from a declared sequence length at 1 MiB, and ciborium grows
//! strings and byte strings only as their bytes actually arrive; this makes that a tested fact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts per thread: the bytes live now and the most live since the last reset.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // try_with: the thread may be tearing its locals down; such frees are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is passed to the system allocator unchanged; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most one input of `len` bytes may make a decoder hold: 4 MiB (serde's 1 MiB preallocation,
/// a few times over) plus 64 bytes per input byte (a value's in-memory form is larger than its
/// encoding: a one-byte CBOR integer becomes an 8-byte i64 in a 24-byte enum, map nodes…).
pub fn bound(len: usize) -> usize {
    4 * 1024 * 1024 + 64 * len
}

/// Runs `f` and fails if it held more than [`bound`]`(len)` bytes at any moment.
pub fn assert_bounded<T>(len: usize, f: impl FnOnce() -> T) -> T {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let held = PEAK.with(Cell::get) - start;
    let limit = bound(len);
    assert!(
        held <= limit as isize,
        "decoding {len} bytes held {held} bytes at once, over the bound of {limit}"
    );
    out
}

#[test]
fn the_counter_sees_an_allocation_and_the_bound_catches_a_large_one() {
    let held = std::panic::catch_unwind(|| {
        assert_bounded(10, || {
            std::hint::black_box(vec![0u8; 8 * 1024 * 1024]).len()
        })
    });
    assert!(
        held.is_err(),
        "8 MiB for 10 bytes of input must fail the bound"
    );
    assert_eq!(
        assert_bounded(10, || std::hint::black_box(vec![0u8; 1024]).len()),
        1024
    );
}
