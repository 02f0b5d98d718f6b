//! Which pages of guest RAM were never touched, from `/proc/self/pagemap`: a page of the
//! VMM's private anonymous mapping that is neither present nor swapped out reads as zero,
//! so round 0 sends it as zero without reading it (reading would fault in the zero page,
//! about a microsecond a page, most of an idle guest's migration).

use std::fs::File;
use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const PAGE: u64 = 4096;

#[derive(Debug)]
pub(crate) struct Pagemap(Option<File>);

impl Pagemap {
    /// The VMM's own pagemap; without one (no procfs), nothing is known to be untouched.
    pub(crate) fn open() -> Self {
        Pagemap(File::open("/proc/self/pagemap").ok())
    }

    /// Whether all `count` pages from host address `host` were never touched.
    pub(crate) fn all_untouched(&self, host: u64, count: usize) -> bool {
        let Some(file) = &self.0 else { return false };
        let mut buf = vec![0u8; count * 8];
        if file.read_exact_at(&mut buf, host / PAGE * 8).is_err() {
            return false;
        }
        buf.chunks_exact(8).all(|e| {
            let entry = u64::from_ne_bytes(e.try_into().unwrap_or([0xff; 8]));
            entry & (PRESENT | SWAPPED) == 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_memory_is_untouched_until_written() {
        let map = Pagemap::open();
        let mut v = vec![0u8; 64 * 4096 + 4096];
        // A page-aligned window inside the allocation (large allocations are fresh mmaps).
        let start = (v.as_ptr() as u64).div_ceil(PAGE) * PAGE;
        let offset = usize::try_from(start - v.as_ptr() as u64).unwrap();
        assert!(map.all_untouched(start, 32));
        v[offset + 5 * 4096] = 1;
        assert!(!map.all_untouched(start, 32));
        assert!(map.all_untouched(start + 6 * PAGE, 8));
    }
}
