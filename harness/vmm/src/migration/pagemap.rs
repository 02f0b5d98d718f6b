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
    fn fresh_guest_ram_is_untouched_until_written() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let map = Pagemap::open();
        let ram = crate::vstate::memory::allocate(16).unwrap();
        let host = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        assert!(map.all_untouched(host, 64));
        ram.write_slice(&[1], GuestAddress(5 * PAGE)).unwrap();
        assert!(!map.all_untouched(host, 64));
        assert!(map.all_untouched(host + 6 * PAGE, 58));
    }
}
