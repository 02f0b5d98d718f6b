//! What the labs read from ELF files (a binary's DT_NEEDED libraries, a kernel module's
//! `.modinfo`), through goblin's bounds-checked parser, without binutils installed.

use goblin::elf::Elf;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("malformed ELF: {0}")]
    Malformed(String),
}

pub(crate) fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

pub(crate) struct ElfFile<'a> {
    bytes: &'a [u8],
    elf: Elf<'a>,
}

impl<'a> ElfFile<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if !is_elf(bytes) {
            return Err(ElfError::NotElf);
        }
        let elf = Elf::parse(bytes).map_err(|e| ElfError::Malformed(e.to_string()))?;
        Ok(Self { bytes, elf })
    }

    /// The contents of the section called `name`, if there is one.
    pub(crate) fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let Some(header) = self
            .elf
            .section_headers
            .iter()
            .find(|h| self.elf.shdr_strtab.get_at(h.sh_name) == Some(name))
        else {
            return Ok(None);
        };
        let Some(range) = header.file_range() else {
            // SHT_NOBITS: no bytes in the file.
            return Ok(Some(&[]));
        };
        self.bytes
            .get(range)
            .map(Some)
            .ok_or_else(|| ElfError::Malformed(format!("section {name} out of range")))
    }

    /// The DT_NEEDED entries (sonames), in order; empty for a static binary.
    pub(crate) fn needed_libraries(&self) -> Vec<String> {
        self.elf.libraries.iter().map(|s| s.to_string()).collect()
    }
}

/// The `depends=` list of a kernel module (`.modinfo` holds NUL-separated `key=value`).
pub(crate) fn module_dependencies(module: &[u8]) -> Result<Vec<String>, ElfError> {
    let elf = ElfFile::parse(module)?;
    let Some(modinfo) = elf.section(".modinfo")? else {
        return Ok(Vec::new());
    };
    let mut dependencies = Vec::new();
    for field in modinfo.split(|&b| b == 0) {
        if let Some(value) = field.strip_prefix(b"depends=") {
            let value = std::str::from_utf8(value)
                .map_err(|_| ElfError::Malformed("non-UTF-8 modinfo".into()))?;
            dependencies.extend(
                value
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Ok(dependencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(ElfFile::parse(b"").err(), Some(ElfError::NotElf));
        assert_eq!(ElfFile::parse(b"hello world").err(), Some(ElfError::NotElf));
        assert!(ElfFile::parse(b"\x7fELF\x01\x01").is_err());
        let mut truncated = b"\x7fELF\x02\x01\x01".to_vec();
        truncated.resize(0x30, 0);
        assert!(ElfFile::parse(&truncated).is_err());
        // A section table pointing far outside the file.
        let mut bogus = vec![0u8; 64];
        bogus[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        bogus[0x10] = 1; // ET_REL
        bogus[0x12] = 62; // EM_X86_64
        bogus[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        bogus[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        bogus[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        bogus[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        assert!(ElfFile::parse(&bogus).is_err());
        // Random bytes behind a valid magic never panic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in [16usize, 64, 200, 4096] {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state & 0xff) as u8
                })
                .collect();
            bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
            if let Ok(elf) = ElfFile::parse(&bytes) {
                let _ = elf.section(".modinfo");
            }
            let _ = module_dependencies(&bytes);
        }
    }

    /// The test binary itself is a dynamically linked ELF64 with libc among its needs.
    #[test]
    fn reads_needed_libraries_of_this_test_binary() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let elf = ElfFile::parse(&bytes).unwrap();
        let needed = elf.needed_libraries();
        assert!(
            needed.iter().any(|name| name.starts_with("libc.so")),
            "{needed:?}"
        );
        assert!(elf.section(".text").unwrap().is_some_and(|t| !t.is_empty()));
        assert!(elf.section(".no-such-section").unwrap().is_none());
    }
}
