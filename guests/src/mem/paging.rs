//! 4 KiB mappings built at run time, in a window at 512 GiB (PML4 entry 1), so the
//! identity map below stays untouched. The window's tables are written from user mode
//! before they are live (all memory is user-accessible; it is a benchmark kernel with
//! nothing to protect); the link into the live PML4 and the TLB flush are the kernel's
//! (`Syscall::SetWindow`): a user-mode write to the table in CR3 makes Xen's shadow
//! paging crash the domain.

use super::arena::{alloc_work, PAGE};
use crate::arch::user::syscall;
use crate::sysabi::Syscall;

/// Virtual base of the window.
pub const WINDOW_BASE: u64 = 0x80_0000_0000;
const PML4_WINDOW_INDEX: usize = 1;
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_USER: u64 = 1 << 2;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
const ENTRIES: u64 = 512;

extern "C" {
    /// The boot code's root page table: `mut`, because the window's entry is written.
    static mut pml4: [u64; 512];
}

/// A window of 4 KiB pages over a physical range.
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    pub va: u64,
    /// Physical address of the first page table (the PTs are contiguous).
    pub first_pt: u64,
}

impl Mapping {
    /// Address of the PTE that maps page `i` of the window.
    pub fn pte(&self, i: u64) -> *mut u64 {
        (self.first_pt + i * 8) as *mut u64
    }
}

/// The boot code's root page table (what CR3 holds), 512 entries.
pub fn root() -> *mut u64 {
    // Takes the address only (no access).
    core::ptr::addr_of_mut!(pml4).cast::<u64>()
}

fn pml4_entry() -> *mut u64 {
    root().wrapping_add(PML4_WINDOW_INDEX)
}

fn zero_page(phys: u64) {
    let p = phys as *mut u64;
    for i in 0..(PAGE / 8) as usize {
        // SAFETY: `phys` is a page the caller just allocated, identity-mapped.
        unsafe { p.add(i).write_volatile(0) };
    }
}

/// Maps `pages` 4 KiB pages at `WINDOW_BASE` onto `[phys, phys + pages * 4 KiB)` and
/// makes the mapping live. The page tables come from work memory.
pub fn map_4k(phys: u64, pages: u64) -> Result<Mapping, &'static str> {
    if pages == 0 || pages > ENTRIES * ENTRIES * ENTRIES {
        return Err("window size out of range");
    }
    let pts = pages.div_ceil(ENTRIES);
    let pds = pts.div_ceil(ENTRIES);
    let tables = 1 + pds + pts;
    let base = alloc_work(tables * PAGE, PAGE).ok_or("no memory left for page tables")?;
    let pdpt = base;
    let first_pd = base + PAGE;
    let first_pt = first_pd + pds * PAGE;
    for t in 0..tables {
        zero_page(base + t * PAGE);
    }
    // The tables are not live yet: these stores are plain memory writes everywhere.
    for i in 0..pages {
        let pte = (first_pt + i * 8) as *mut u64;
        // SAFETY: inside the PT pages allocated above.
        unsafe { pte.write_volatile((phys + i * PAGE) | TABLE_FLAGS) };
    }
    for j in 0..pts {
        let pde = (first_pd + j * 8) as *mut u64;
        // SAFETY: inside the PD pages allocated above (pts <= pds * 512).
        unsafe { pde.write_volatile((first_pt + j * PAGE) | TABLE_FLAGS) };
    }
    for k in 0..pds {
        let pdpte = (pdpt + k * 8) as *mut u64;
        // SAFETY: inside the PDPT page (pds <= 512).
        unsafe { pdpte.write_volatile((first_pd + k * PAGE) | TABLE_FLAGS) };
    }
    syscall(Syscall::SetWindow as u64, pdpt | TABLE_FLAGS, 0, 0);
    Ok(Mapping {
        va: WINDOW_BASE,
        first_pt,
    })
}

/// Removes the window.
pub fn unmap() {
    syscall(Syscall::SetWindow as u64, 0, 0, 0);
}

/// Writes the window's PML4 entry (kernel mode, for `Syscall::SetWindow`). Only a table
/// entry (present, writable, user, page-aligned) or 0 is taken; anything else unlinks.
pub fn set_window_entry(entry: u64) {
    let valid = entry & (PAGE - 1) == TABLE_FLAGS;
    // SAFETY: PML4 entry 1 belongs to the window; nothing else uses it.
    unsafe { pml4_entry().write_volatile(if valid { entry } else { 0 }) };
}

/// Flushes the TLB (a CR3 reload, in the kernel).
pub fn flush_tlb() {
    syscall(Syscall::FlushTlb as u64, 0, 0, 0);
}
