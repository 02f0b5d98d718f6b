//! Physical memory for workloads, above the image: a work region that grows up from the
//! bottom and is handed back after each workload, and a fresh region that grows down from
//! the top of RAM and is never reused, so every page in it is one nobody has touched yet
//! (`mem.first-touch` needs exactly that).

use crate::global::Global;

pub const PAGE: u64 = 4096;
pub const HUGE_PAGE: u64 = 2 << 20;

extern "C" {
    static __image_end: u8;
}

#[derive(Clone, Copy)]
struct Arena {
    /// First byte of the work region (fixed).
    work_start: u64,
    /// Next free byte of the work region.
    work_next: u64,
    /// Lowest byte handed out from the fresh region (it grows down).
    fresh_next: u64,
}

static ARENA: Global<Option<Arena>> = Global::new(None);

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Sets the arena over `[end of image, ram_end)`.
pub fn init(ram_end: u64) {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let start = align_up(image_end, HUGE_PAGE);
    ARENA.set(Some(Arena {
        work_start: start,
        work_next: start,
        fresh_next: ram_end & !(HUGE_PAGE - 1),
    }));
}

/// Work memory: `bytes` aligned to `align`, given back by [`reset_work`]. Its contents
/// are whatever an earlier workload left.
pub fn alloc_work(bytes: u64, align: u64) -> Option<u64> {
    let mut a = ARENA.get()?;
    let at = align_up(a.work_next, align);
    let end = at.checked_add(bytes)?;
    if end > a.fresh_next {
        return None;
    }
    a.work_next = end;
    ARENA.set(Some(a));
    Some(at)
}

/// How many bytes [`alloc_work`] could hand out at `align` right now.
pub fn work_available(align: u64) -> u64 {
    match ARENA.get() {
        Some(a) => a.fresh_next.saturating_sub(align_up(a.work_next, align)),
        None => 0,
    }
}

/// Fresh memory: `bytes` aligned to `align` that nothing has touched since boot.
pub fn alloc_fresh(bytes: u64, align: u64) -> Option<u64> {
    let mut a = ARENA.get()?;
    let at = a.fresh_next.checked_sub(bytes)? & !(align - 1);
    if at < a.work_next {
        return None;
    }
    a.fresh_next = at;
    ARENA.set(Some(a));
    Some(at)
}

/// Hands the work region back (between workloads).
pub fn reset_work() {
    if let Some(mut a) = ARENA.get() {
        a.work_next = a.work_start;
        ARENA.set(Some(a));
    }
}
