//! Dirty-page tracking with KVM's dirty log: the memory slot gets
//! `KVM_MEM_LOG_DIRTY_PAGES`, and each `KVM_GET_DIRTY_LOG` returns (and clears) the
//! pages the guest wrote since the last call. The VMM's own writes to guest RAM (the
//! devices' used rings and status bytes, virtio-blk reads, the balloon's released pages)
//! do not appear there: they are in vm-memory's bitmap of each region (see
//! `vstate::memory`), which each fetch takes and clears word by word (atomically) and
//! ORs in.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::ring::DirtyRings;
use super::MigrationError;
use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// Page frames written since the last fetch, as a bitmap of 64 pages a word.
#[derive(Debug, Default)]
pub(crate) struct DirtyBitmap(pub(crate) Vec<u64>);

impl DirtyBitmap {
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Every page of a RAM of `pages` pages.
    pub(crate) fn all(pages: u64) -> Self {
        let words = u64_to_usize(pages.div_ceil(64));
        let mut bits = vec![u64::MAX; words];
        if !pages.is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        DirtyBitmap(bits)
    }

    /// Runs of set bits as (first page, count), each at most `max` pages.
    pub(crate) fn runs(&self, max: u32) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (w, &word) in self.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let pfn = w as u64 * 64 + bit;
                match runs.last_mut() {
                    Some((first, n)) if *first + u64::from(*n) == pfn && *n < max => *n += 1,
                    _ => runs.push((pfn, 1)),
                }
            }
        }
        runs
    }
}

/// Sets or clears the dirty-log flag on every slot of `memory` (one slot a region, in
/// the order `memory::register` gave them).
pub(crate) fn set_logging(vm: &VmFd, memory: &GuestMemory, on: bool) -> Result<(), MigrationError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| MigrationError::State(format!("guest RAM address: {e}")))?;
        let descriptor = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same live mapping `memory::register` gave this slot, owned by
        // `memory`, which the VM keeps for as long as it exists; only the flags change.
        unsafe { vm.set_user_memory_region(descriptor) }.map_err(|source| MigrationError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION (dirty log)",
            source,
        })?;
    }
    Ok(())
}

/// The pages written since the last call: from the dirty rings where the VM has them,
/// else KVM's dirty log (which KVM clears as it hands it over); the VMM's own writes
/// ORed in.
pub(crate) fn fetch(
    vm: &VmFd,
    memory: &GuestMemory,
    rings: Option<&DirtyRings>,
) -> Result<DirtyBitmap, MigrationError> {
    let mut bitmap = match rings {
        Some(rings) => rings.take()?,
        None => Vec::new(),
    };
    for (slot, region) in memory.iter().enumerate() {
        let first = u64_to_usize(region.start_addr().raw_value() / 4096 / 64);
        let words = match rings {
            Some(_) => Vec::new(),
            None => vm
                .get_dirty_log(
                    u32::try_from(slot).unwrap_or(u32::MAX),
                    u64_to_usize(region.len()),
                )
                .map_err(|source| MigrationError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    source,
                })?,
        };
        // The VMM's own writes: same layout (bit n = page n of the region).
        let own = crate::vstate::memory::take_vmm_dirty(region);
        let len = own.len().max(words.len());
        if bitmap.len() < first + len {
            bitmap.resize(first + len, 0);
        }
        // Regions are page-aligned and 64-page aligned here (one at 0 today).
        for i in 0..len {
            bitmap[first + i] |=
                words.get(i).copied().unwrap_or(0) | own.get(i).copied().unwrap_or(0);
        }
    }
    Ok(DirtyBitmap(bitmap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_at_the_limit() {
        let b = DirtyBitmap(vec![0b1110_0111, 1 << 63, 1]);
        assert_eq!(b.count(), 8);
        assert_eq!(b.runs(256), vec![(0, 3), (5, 3), (127, 2)]);
        assert_eq!(b.runs(2), vec![(0, 2), (2, 1), (5, 2), (7, 1), (127, 2)]);
        let all = DirtyBitmap::all(70);
        assert_eq!(all.count(), 70);
        assert_eq!(all.runs(64), vec![(0, 64), (64, 6)]);
    }
}
