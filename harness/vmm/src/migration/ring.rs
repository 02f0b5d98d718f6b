//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`), where the host offers it: instead of a
//! bitmap per memory slot fetched with `KVM_GET_DIRTY_LOG`, each vCPU has a ring of
//! `kvm_dirty_gfn` entries, shared with KVM by `mmap` of the vCPU file at
//! `KVM_DIRTY_LOG_PAGE_OFFSET`, onto which KVM pushes every page the vCPU dirties while
//! the slot has `KVM_MEM_LOG_DIRTY_PAGES`. The VMM harvests an entry (reads its slot and
//! offset, then marks it reset) and `KVM_RESET_DIRTY_RINGS` hands harvested entries back
//! and write-protects their pages again. A vCPU whose ring fills exits with
//! `KVM_EXIT_DIRTY_RING_FULL`; its thread harvests and re-enters.
//!
//! The ring must be enabled before the first vCPU exists, for the VM's whole life (KVM
//! then refuses `KVM_GET_DIRTY_LOG`), so [`enable`] runs when every VM is made; where
//! the capability is missing or refused, the dirty log is used. kvm-ioctls has no
//! wrapper for the ring: the `mmap` and `KVM_RESET_DIRTY_RINGS` are raw, below.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::MigrationError;

/// Ring size asked for by default, in bytes per vCPU (16384 entries; KVM here allows up
/// to 1 MiB).
pub(crate) const RING_BYTES: u32 = 256 << 10;
/// `kvm_dirty_gfn.flags`: KVM published the entry; the VMM harvested it.
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
/// The exit of a vCPU whose ring is full (kvm-ioctls reports it as `Unsupported`).
pub(crate) const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;

/// Enables a ring of up to `wanted` bytes (a power of two, at least a page) per vCPU on
/// a VM that has no vCPU yet; its size, or `None` where the host does not offer it or
/// refuses it (then the dirty log serves).
pub(crate) fn enable(vm: &VmFd, wanted: u32) -> Option<u32> {
    let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
    let bytes = u32::try_from(max).ok().filter(|m| *m > 0)?.min(wanted);
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap).ok().map(|()| bytes)
}

/// One vCPU's ring, mapped.
#[derive(Debug)]
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to harvest (the VMM's index; KVM keeps its own).
    fetch: u32,
}

// SAFETY: the mapping is process memory shared with KVM, reached only under the
// `DirtyRings` mutex (KVM's side is synchronised through each entry's flags).
unsafe impl Send for Ring {}

impl Ring {
    /// Maps `vcpu`'s ring of `bytes`.
    fn map(vcpu: &VcpuFd, bytes: u32) -> Result<Self, MigrationError> {
        let page = page_size();
        let len = usize::try_from(bytes).unwrap_or(usize::MAX);
        let offset = libc::off_t::try_from(KVM_DIRTY_LOG_PAGE_OFFSET as usize * page)
            .unwrap_or(libc::off_t::MAX);
        // SAFETY: a fresh shared mapping of `len` bytes of the vCPU file at KVM's ring
        // offset (the size the VM was given); it touches no existing memory, and is
        // unmapped only on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MigrationError::Io {
                what: "mapping a vCPU's dirty ring",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Ring {
            base: base.cast(),
            entries: bytes / u32::try_from(size_of::<kvm_dirty_gfn>()).unwrap_or(16),
            fetch: 0,
        })
    }

    /// Harvests every published entry into `out` as (slot, offset); how many.
    fn harvest(&mut self, out: &mut impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        while n < self.entries {
            let i = usize::try_from(self.fetch % self.entries).unwrap_or(0);
            // SAFETY: `i < entries`, inside the mapping; `flags` is a naturally aligned
            // u32 that KVM writes, read and written atomically (acquire/release) as
            // KVM's ring protocol asks.
            let flags = unsafe { AtomicU32::from_ptr(&raw mut (*self.base.add(i)).flags) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire): KVM does not
            // write it again until it is reset; it lies inside the mapping.
            let (slot, offset) = unsafe {
                let e = self.base.add(i);
                (
                    std::ptr::read_volatile(&raw const (*e).slot),
                    std::ptr::read_volatile(&raw const (*e).offset),
                )
            };
            out(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.entries as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: the mapping `map` made, of this length, not used after this.
        unsafe { libc::munmap(self.base.cast(), len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Every vCPU's ring, and the pages harvested from them not yet taken.
#[derive(Debug)]
pub(crate) struct DirtyRings {
    vm: Arc<VmFd>,
    /// Harvests a vCPU asked for when its ring filled.
    full: AtomicU64,
    inner: Mutex<Harvest>,
    /// First page frame of each memory slot (slot `n` = region `n`), and its pages.
    slots: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Harvest {
    rings: Vec<Ring>,
    /// Bit n = page frame n, harvested since the last take.
    pages: Vec<u64>,
}

impl DirtyRings {
    /// Maps the rings of `vcpus` (each of `bytes`); `slots` as above.
    pub(crate) fn new(
        vm: Arc<VmFd>,
        vcpus: &[&VcpuFd],
        bytes: u32,
        slots: Vec<(u64, u64)>,
    ) -> Result<Self, MigrationError> {
        let rings = vcpus
            .iter()
            .map(|v| Ring::map(v, bytes))
            .collect::<Result<_, _>>()?;
        let pages: u64 = slots.iter().map(|(first, n)| first + n).max().unwrap_or(0);
        Ok(DirtyRings {
            vm,
            full: AtomicU64::new(0),
            inner: Mutex::new(Harvest {
                rings,
                pages: vec![0; crate::cast::u64_to_usize(pages.div_ceil(64))],
            }),
            slots,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        // Plain data: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Harvests every ring and hands the entries back to KVM (a vCPU whose ring filled
    /// calls this, as does each fetch).
    pub(crate) fn harvest(&self) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        let Harvest { rings, pages } = &mut *inner;
        let slots = &self.slots;
        let mut mark = |slot: u32, offset: u64| {
            // The low 16 bits name the slot (the address space above is 0 here); an
            // entry outside the VM's slots is dropped rather than trusted.
            let Some((first, len)) = slots.get((slot & 0xffff) as usize) else {
                return;
            };
            if offset < *len {
                let pfn = first + offset;
                if let Some(w) = pages.get_mut(crate::cast::u64_to_usize(pfn / 64)) {
                    *w |= 1 << (pfn % 64);
                }
            }
        };
        let harvested: u32 = rings.iter_mut().map(|r| r.harvest(&mut mark)).sum();
        if harvested > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only KVM's
            // rings, which this VM's fd owns.
            let rc = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
            if rc < 0 {
                return Err(MigrationError::Io {
                    what: "KVM_RESET_DIRTY_RINGS",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// A vCPU's ring filled (`KVM_EXIT_DIRTY_RING_FULL`): harvests and counts it.
    pub(crate) fn harvest_full(&self) -> Result<(), MigrationError> {
        self.full.fetch_add(1, Ordering::Relaxed);
        self.harvest()
    }

    /// How many times a vCPU's ring filled.
    pub(crate) fn full_exits(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }

    /// Harvests, then takes the pages found since the last take (bit n = page frame n).
    pub(crate) fn take(&self) -> Result<Vec<u64>, MigrationError> {
        self.harvest()?;
        let mut inner = self.lock();
        let empty = vec![0; inner.pages.len()];
        Ok(std::mem::replace(&mut inner.pages, empty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harvest on a ring in plain memory, filled the way KVM fills it.
    #[test]
    fn published_entries_are_harvested_once_in_order_and_reset() {
        let mut entries = vec![kvm_dirty_gfn::default(); 4];
        for (i, e) in entries.iter_mut().enumerate().take(3) {
            e.flags = GFN_DIRTY;
            e.slot = 0;
            e.offset = 10 + i as u64;
        }
        // Not ours to unmap: the rings never drop.
        let mut ring = std::mem::ManuallyDrop::new(Ring {
            base: entries.as_mut_ptr(),
            entries: 4,
            fetch: 0,
        });
        let mut seen = Vec::new();
        assert_eq!(ring.harvest(&mut |s, o| seen.push((s, o))), 3);
        assert_eq!(seen, vec![(0, 10), (0, 11), (0, 12)]);
        assert!(entries[..3].iter().all(|e| e.flags == GFN_RESET));
        // KVM publishes the fourth, then wraps to the first once it was reset.
        entries[3] = kvm_dirty_gfn {
            flags: GFN_DIRTY,
            slot: 0,
            offset: 13,
        };
        entries[0] = kvm_dirty_gfn {
            flags: GFN_DIRTY,
            slot: 0,
            offset: 14,
        };
        let mut ring = std::mem::ManuallyDrop::new(Ring {
            base: entries.as_mut_ptr(),
            entries: 4,
            fetch: 3,
        });
        seen.clear();
        assert_eq!(ring.harvest(&mut |s, o| seen.push((s, o))), 2);
        assert_eq!(seen, vec![(0, 13), (0, 14)]);
        assert_eq!(ring.harvest(&mut |_, _| {}), 0);
    }
}
