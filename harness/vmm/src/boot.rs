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

use crate::vstate::memory::GuestMemory;
use crate::VmmError;

/// Where the boot data goes: below the image at 1 MiB, in the layout Firecracker uses.
pub(crate) const START_INFO_ADDR: u64 = 0x6000;
pub(crate) const MEMMAP_ADDR: u64 = 0x7000;
pub(crate) const CMDLINE_ADDR: u64 = 0x2_0000;
pub(crate) const CMDLINE_MAX: usize = 4096;
/// End of conventional memory below the legacy hole.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_RAM_START: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loads the image (an ELF with a PVH entry note) and its boot data; returns the PVH
/// entry point.
pub(crate) fn load(memory: &GuestMemory, image: &[u8], cmdline: &str) -> Result<u64, VmmError> {
    let mut reader = Cursor::new(image);
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
pub(crate) fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
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

pub(crate) fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO_ADDR,
        // Bit 1 is reserved and must be set.
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vstate::memory;
    use vm_memory::Bytes;

    /// Where the test image loads, and its PVH entry.
    const LOAD_ADDR: u64 = 0x10_0000;
    const ENTRY: u64 = LOAD_ADDR + 0x100;

    /// The smallest image a PVH loader takes: a 64-bit ELF with one PT_LOAD (the whole
    /// file at 1 MiB) and a PT_NOTE holding `XEN_ELFNOTE_PHYS32_ENTRY` (18), then `code`
    /// (32-bit, protected mode, paging off) at the entry.
    pub(crate) fn pvh_image(code: &[u8]) -> Vec<u8> {
        const EHDR: u16 = 64;
        const PHDR: u16 = 56;
        let note_offset = u64::from(EHDR + 2 * PHDR);
        let mut note = Vec::new();
        note.extend(4u32.to_le_bytes()); // namesz
        note.extend(4u32.to_le_bytes()); // descsz
        note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend(b"Xen\0");
        note.extend(u32::try_from(ENTRY).unwrap().to_le_bytes());
        let file_len = ENTRY - LOAD_ADDR + code.len() as u64;

        let mut f = Vec::new();
        // ELFCLASS64, little-endian, version 1, ET_EXEC, EM_X86_64.
        f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend(2u16.to_le_bytes());
        f.extend(62u16.to_le_bytes());
        f.extend(1u32.to_le_bytes());
        f.extend(ENTRY.to_le_bytes()); // e_entry
        f.extend(u64::from(EHDR).to_le_bytes()); // e_phoff
        f.extend(0u64.to_le_bytes()); // e_shoff
        f.extend(0u32.to_le_bytes()); // e_flags
        f.extend(EHDR.to_le_bytes());
        f.extend(PHDR.to_le_bytes());
        f.extend(2u16.to_le_bytes()); // e_phnum
        f.extend([0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
        let phdr = |f: &mut Vec<u8>, kind: u32, offset: u64, size: u64| {
            f.extend(kind.to_le_bytes());
            f.extend(7u32.to_le_bytes()); // p_flags
            f.extend(offset.to_le_bytes());
            f.extend((LOAD_ADDR + offset).to_le_bytes()); // p_vaddr
            f.extend((LOAD_ADDR + offset).to_le_bytes()); // p_paddr
            f.extend(size.to_le_bytes()); // p_filesz
            f.extend(size.to_le_bytes()); // p_memsz
            f.extend(4u64.to_le_bytes()); // p_align
        };
        phdr(&mut f, 1, 0, file_len); // PT_LOAD
        phdr(&mut f, 4, note_offset, note.len() as u64); // PT_NOTE
        f.extend(&note);
        f.resize(usize::try_from(ENTRY - LOAD_ADDR).unwrap(), 0);
        f.extend(code);
        f
    }

    #[test]
    fn loads_image_cmdline_and_start_info() {
        let mem = memory::allocate(32).unwrap();
        let image = pvh_image(&[0xf4]); // hlt
        let entry = load(&mem, &image, "hvbench run=cpu.idle").unwrap();
        assert_eq!(entry, ENTRY);
        let mut first = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(LOAD_ADDR)).unwrap();
        assert_eq!(&first, b"\x7fELF", "the PT_LOAD segment is in guest RAM");
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
        let image = pvh_image(&[0xf4]); // hlt
        load(&mem, &image, &"x".repeat(CMDLINE_MAX)).unwrap_err();
        load(&mem, &image, "a\0b").unwrap_err();
    }
}
