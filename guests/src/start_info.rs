//! The PVH start info (`struct hvm_start_info`, xen/include/public/arch-x86/hvm/start_info.h)
//! that every PVH loader leaves at the guest-physical address in RBX.

/// `hvm_start_info.magic`: "xEn3" with the top bit of each byte cleared.
pub const MAGIC: u32 = 0x336e_c578;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    // Version 1 and later.
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// E820 type of usable RAM.
pub const MEMMAP_RAM: u32 = 1;

/// Most memory-map entries read; loaders give a handful.
const MAX_MEMMAP: u32 = 128;

/// Reads the start info at `paddr` (identity-mapped). `None` if it is not one.
pub fn read(paddr: u64) -> Option<StartInfo> {
    if paddr == 0 || !paddr.is_multiple_of(8) {
        return None;
    }
    // SAFETY: the loader put the structure at `paddr`, which the boot page tables map;
    // the magic is checked before any field is trusted.
    let info = unsafe { (paddr as *const StartInfo).read_volatile() };
    (info.magic == MAGIC).then_some(info)
}

/// The command line, up to its NUL or `max` bytes, whichever is first; `None` if absent
/// or not ASCII.
pub fn cmdline(info: &StartInfo, max: usize) -> Option<&'static str> {
    if info.cmdline_paddr == 0 {
        return None;
    }
    let base = info.cmdline_paddr as *const u8;
    let mut len = 0;
    // SAFETY: the loader wrote a NUL-terminated string there; reading stops at the NUL or
    // at `max` bytes, within the identity-mapped low 4 GiB.
    while len < max && unsafe { base.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes were just read from this range and nothing writes to it.
    let bytes = unsafe { core::slice::from_raw_parts(base, len) };
    core::str::from_utf8(bytes).ok().filter(|s| s.is_ascii())
}

/// The usable RAM ranges of the memory map (empty before version 1).
pub fn ram_ranges(info: &StartInfo) -> impl Iterator<Item = (u64, u64)> {
    let count = if info.version >= 1 && info.memmap_paddr != 0 {
        info.memmap_entries.min(MAX_MEMMAP)
    } else {
        0
    };
    let table = info.memmap_paddr as *const MemmapEntry;
    (0..count as usize).filter_map(move |i| {
        // SAFETY: `i` is below the loader's entry count (bounded by MAX_MEMMAP).
        let e = unsafe { table.add(i).read_volatile() };
        (e.kind == MEMMAP_RAM).then_some((e.addr, e.size))
    })
}

/// End of RAM from the PVH memory map at `start_info` (the highest usable byte below
/// 4 GiB; 0 when there is no map).
pub fn ram_end(start_info: u64) -> u64 {
    read(start_info)
        .map(|s| {
            ram_ranges(&s)
                .map(|(base, size)| base.saturating_add(size))
                .filter(|end| *end <= workloads::abi::MAX_LOW_RAM)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}
