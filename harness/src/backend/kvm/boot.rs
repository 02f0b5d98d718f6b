//! Loading the guest with the PVH boot protocol: the ELF's segments, the command line,
//! `hvm_start_info` with its memory map, and the vCPU state the protocol starts in
//! (32-bit protected mode, paging off, RBX = start info).

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::vstate::memory::GuestMemory;
use super::VmmError;
use crate::guest_image::GuestImage;

/// Where the boot data goes: below the image at 1 MiB, in the layout Firecracker uses.
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional memory below the legacy hole.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_RAM_START: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loads the image and its boot data; returns the PVH entry point.
pub fn load(memory: &GuestMemory, image: &GuestImage, cmdline: &str) -> Result<u64, VmmError> {
    let mut reader = Cursor::new(image.bytes());
    let loaded =
        Elf::load(memory, None, &mut reader, None).map_err(|e| VmmError::Load(e.to_string()))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(VmmError::Load("the image has no PVH entry point".into())),
    };

    if cmdline.len() >= CMDLINE_MAX || cmdline.bytes().any(|b| b == 0) {
        return Err(VmmError::Load(format!(
            "command line of {} bytes is too long or holds a NUL",
            cmdline.len()
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| VmmError::Load(format!("writing the command line: {e}")))?;

    let ram_end = memory.last_addr().0 + 1;
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: LOW_RAM_END,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIGH_RAM_START,
            size: ram_end - HIGH_RAM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        // Two entries: a u32 with room to spare.
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, memory)
        .map_err(|e| VmmError::Load(format!("writing the PVH start info: {e}")))?;
    Ok(entry)
}

fn flat_segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The PVH entry state: flat 32-bit segments, protected mode, paging off.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = flat_segment(0x08, 0xb, 1);
    let data = flat_segment(0x10, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        db: 0,
        s: 0,
        ..flat_segment(0x18, 0xb, 0)
    };
    // PE and ET; everything else (paging, PAE, long mode) is the guest's to turn on.
    sregs.cr0 = 0x11;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO_ADDR,
        // Bit 1 is reserved and must be set.
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kvm::vstate::memory;
    use vm_memory::Bytes;

    #[test]
    fn loads_image_cmdline_and_start_info() {
        let mem = memory::allocate(32).unwrap();
        let image = GuestImage::embedded().unwrap();
        let entry = load(&mem, &image, "hvbench run=cpu.idle").unwrap();
        assert_eq!(entry, image.pvh_entry() as u64);
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.memmap_entries, 2);
        let second: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                MEMMAP_ADDR + std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(second.addr + second.size, 32 << 20);
        let mut cmd = [0u8; 21];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmd, b"hvbench run=cpu.idle\0");
    }

    #[test]
    fn refuses_bad_command_lines() {
        let mem = memory::allocate(32).unwrap();
        let image = GuestImage::embedded().unwrap();
        load(&mem, &image, &"x".repeat(CMDLINE_MAX)).unwrap_err();
        load(&mem, &image, "a\0b").unwrap_err();
    }
}
