//! Guest memory: one anonymous mapping at guest-physical 0, registered with KVM.
//!
//! Each region carries vm-memory's dirty bitmap (`backend-bitmap`): every write the VMM
//! itself makes through vm-memory (used rings, status bytes, a balloon's released pages)
//! sets its page's bit, which KVM's dirty log cannot see; a migration ORs the two. Writes
//! through a raw pointer (the kernel's preadv or io_uring into guest buffers) are marked
//! with [`mark_dirty`] once they landed.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cast::u64_to_usize;
use crate::VmmError;

pub(crate) type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest the image and its boot data fit in.
pub const MIN_MEMORY_MIB: u32 = 16;

/// Allocates `mib` MiB of guest RAM at guest-physical 0 (below the 32-bit MMIO hole).
pub(crate) fn allocate(mib: u32) -> Result<GuestMemory, VmmError> {
    let max_mib = u32::try_from(workloads::abi::MAX_LOW_RAM >> 20).unwrap_or(u32::MAX);
    if !(MIN_MEMORY_MIB..=max_mib).contains(&mib) {
        return Err(VmmError::MemorySize {
            mib,
            min: MIN_MEMORY_MIB,
            max: max_mib,
        });
    }
    let size = u64_to_usize(u64::from(mib) << 20);
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|source| VmmError::Allocate { mib, source })
}

/// How the host may back guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advice {
    /// KSM may merge identical pages (`mem.ksm`'s guests).
    Mergeable,
    /// Transparent huge pages: a guest's 2 MiB mappings then meet 2 MiB host pages.
    HugePages,
}

impl Advice {
    fn flag(self) -> (libc::c_int, &'static str) {
        match self {
            Advice::Mergeable => (libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
            Advice::HugePages => (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
        }
    }
}

/// Gives the kernel `advice` on every region of guest RAM.
pub(crate) fn advise(memory: &GuestMemory, advice: Advice) -> Result<(), VmmError> {
    let (flag, name) = advice.flag();
    for region in memory.iter() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(VmmError::HostAddress)?;
        let len = u64_to_usize(region.len());
        // SAFETY: [host, host + len) is one live anonymous mapping owned by `memory`;
        // the advice changes how the kernel may back it, never its contents.
        let rc = unsafe { libc::madvise(host.cast::<libc::c_void>(), len, flag) };
        if rc != 0 {
            return Err(VmmError::Madvise {
                advice: name,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Registers every region of `memory` with the VM, one memory slot each.
pub(crate) fn register(vm: &kvm_ioctls::VmFd, memory: &GuestMemory) -> Result<(), VmmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(VmmError::HostAddress)?;
        let descriptor = kvm_bindings::kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmmError::TooManyRegions)?,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`,
        // which the caller keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(descriptor) }.map_err(|source| VmmError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}

/// Marks `[addr, addr + len)` written by the VMM (a write that vm-memory did not see:
/// through a raw pointer, by the kernel). Call after the data landed, so a migration
/// that fetches the mark copies the new contents. Addresses outside RAM are ignored.
pub(crate) fn mark_dirty(memory: &GuestMemory, addr: GuestAddress, len: usize) {
    let mut at = addr;
    let mut left = len;
    while left > 0 {
        let Some((region, offset)) = memory.to_region_addr(at) else {
            return;
        };
        let here = u64_to_usize(region.len() - offset.raw_value()).min(left);
        region
            .bitmap()
            .mark_dirty(u64_to_usize(offset.raw_value()), here);
        left -= here;
        at = GuestAddress(at.raw_value() + here as u64);
    }
}

/// The pages of `region` the VMM wrote since the last call (bit n = page n; taken and
/// cleared a word at a time, atomically, so a write racing the call is never lost).
pub(crate) fn take_vmm_dirty(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> Vec<u64> {
    vm_memory::MmapRegion::bitmap(region).get_and_reset()
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn the_vmms_own_writes_are_marked_once() {
        let ram = allocate(16).unwrap();
        let region = ram.iter().next().unwrap();
        assert!(take_vmm_dirty(region).iter().all(|w| *w == 0));
        ram.write_obj(1u32, GuestAddress(5 * 4096 + 8)).unwrap();
        mark_dirty(&ram, GuestAddress(70 * 4096 - 1), 2);
        mark_dirty(&ram, GuestAddress(u64::MAX - 1), 2);
        let bits = take_vmm_dirty(region);
        assert_eq!(bits[0], 1 << 5);
        assert_eq!(bits[1], 0b11 << 5, "pages 69 and 70");
        assert_eq!(bits.iter().map(|w| w.count_ones()).sum::<u32>(), 3);
        assert!(take_vmm_dirty(region).iter().all(|w| *w == 0));
    }
}
