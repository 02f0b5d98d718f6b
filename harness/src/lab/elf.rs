//! Just enough of ELF64 (little-endian, x86-64) to read a binary's DT_NEEDED libraries and a
//! kernel module's `.modinfo`, without depending on binutils being installed.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("only little-endian ELF64 is supported")]
    Unsupported,
    #[error("malformed ELF: {0}")]
    Malformed(&'static str),
}

const SECTION_TYPE_DYNAMIC: u32 = 6;
const SECTION_TYPE_NOBITS: u32 = 8;
const DYNAMIC_TAG_NULL: u64 = 0;
const DYNAMIC_TAG_NEEDED: u64 = 1;

pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

struct Section {
    name_offset: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

pub struct ElfFile<'a> {
    bytes: &'a [u8],
    sections: Vec<Section>,
    section_names_index: usize,
}

fn read_u16(bytes: &[u8], at: usize) -> Result<u16, ElfError> {
    let slice = bytes
        .get(
            at..at
                .checked_add(2)
                .ok_or(ElfError::Malformed("offset out of range"))?,
        )
        .ok_or(ElfError::Malformed("truncated"))?;
    Ok(u16::from_le_bytes([slice[0], slice[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, ElfError> {
    let slice = bytes
        .get(
            at..at
                .checked_add(4)
                .ok_or(ElfError::Malformed("offset out of range"))?,
        )
        .ok_or(ElfError::Malformed("truncated"))?;
    let mut word = [0u8; 4];
    word.copy_from_slice(slice);
    Ok(u32::from_le_bytes(word))
}

fn read_u64(bytes: &[u8], at: usize) -> Result<u64, ElfError> {
    let slice = bytes
        .get(
            at..at
                .checked_add(8)
                .ok_or(ElfError::Malformed("offset out of range"))?,
        )
        .ok_or(ElfError::Malformed("truncated"))?;
    let mut word = [0u8; 8];
    word.copy_from_slice(slice);
    Ok(u64::from_le_bytes(word))
}

fn to_index(value: u64) -> Result<usize, ElfError> {
    usize::try_from(value).map_err(|_| ElfError::Malformed("offset out of range"))
}

impl<'a> ElfFile<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if !is_elf(bytes) {
            return Err(ElfError::NotElf);
        }
        // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
        if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
            return Err(ElfError::Unsupported);
        }
        let section_table = to_index(read_u64(bytes, 0x28)?)?;
        let entry_size = usize::from(read_u16(bytes, 0x3a)?);
        let count = usize::from(read_u16(bytes, 0x3c)?);
        let section_names_index = usize::from(read_u16(bytes, 0x3e)?);
        if count > 0 && entry_size < 64 {
            return Err(ElfError::Malformed("section header entry too small"));
        }
        let mut sections = Vec::with_capacity(count);
        for index in 0..count {
            let at = index
                .checked_mul(entry_size)
                .and_then(|offset| offset.checked_add(section_table))
                .and_then(|at| at.checked_add(64).map(|_| at))
                .ok_or(ElfError::Malformed("section table out of range"))?;
            sections.push(Section {
                name_offset: read_u32(bytes, at)?,
                kind: read_u32(bytes, at + 4)?,
                offset: read_u64(bytes, at + 24)?,
                size: read_u64(bytes, at + 32)?,
                link: read_u32(bytes, at + 40)?,
            });
        }
        Ok(Self {
            bytes,
            sections,
            section_names_index,
        })
    }

    fn contents(&self, section: &Section) -> Result<&'a [u8], ElfError> {
        if section.kind == SECTION_TYPE_NOBITS {
            return Ok(&[]);
        }
        let start = to_index(section.offset)?;
        let end = start
            .checked_add(to_index(section.size)?)
            .ok_or(ElfError::Malformed("section out of range"))?;
        self.bytes
            .get(start..end)
            .ok_or(ElfError::Malformed("section out of range"))
    }

    fn string_at(table: &[u8], offset: usize) -> Result<&str, ElfError> {
        let tail = table
            .get(offset..)
            .ok_or(ElfError::Malformed("string offset out of range"))?;
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(ElfError::Malformed("unterminated string"))?;
        std::str::from_utf8(&tail[..end]).map_err(|_| ElfError::Malformed("non-UTF-8 string"))
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let Some(names_section) = self.sections.get(self.section_names_index) else {
            return Ok(None);
        };
        let names = self.contents(names_section)?;
        for section in &self.sections {
            if Self::string_at(names, section.name_offset as usize)? == name {
                return self.contents(section).map(Some);
            }
        }
        Ok(None)
    }

    /// The DT_NEEDED entries (sonames), in order; empty for a static binary.
    pub fn needed_libraries(&self) -> Result<Vec<String>, ElfError> {
        let mut needed = Vec::new();
        for section in self
            .sections
            .iter()
            .filter(|s| s.kind == SECTION_TYPE_DYNAMIC)
        {
            let strings_section = self
                .sections
                .get(section.link as usize)
                .ok_or(ElfError::Malformed("dynamic string table missing"))?;
            let strings = self.contents(strings_section)?;
            for entry in self.contents(section)?.chunks_exact(16) {
                let tag = read_u64(entry, 0)?;
                let value = read_u64(entry, 8)?;
                match tag {
                    DYNAMIC_TAG_NULL => break,
                    DYNAMIC_TAG_NEEDED => {
                        needed.push(Self::string_at(strings, to_index(value)?)?.to_string())
                    }
                    _ => {}
                }
            }
        }
        Ok(needed)
    }
}

/// The `depends=` list of a kernel module (`.modinfo` holds NUL-separated `key=value`).
pub fn module_dependencies(module: &[u8]) -> Result<Vec<String>, ElfError> {
    let elf = ElfFile::parse(module)?;
    let Some(modinfo) = elf.section(".modinfo")? else {
        return Ok(Vec::new());
    };
    let mut dependencies = Vec::new();
    for field in modinfo.split(|&b| b == 0) {
        if let Some(value) = field.strip_prefix(b"depends=") {
            let value =
                std::str::from_utf8(value).map_err(|_| ElfError::Malformed("non-UTF-8 modinfo"))?;
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
        assert_eq!(
            ElfFile::parse(b"\x7fELF\x01\x01").err(),
            Some(ElfError::Unsupported)
        );
        let mut truncated = b"\x7fELF\x02\x01\x01".to_vec();
        truncated.resize(0x30, 0);
        assert!(ElfFile::parse(&truncated).is_err());
        // A section table pointing far outside the file.
        let mut bogus = vec![0u8; 64];
        bogus[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bogus[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        bogus[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        bogus[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        assert!(ElfFile::parse(&bogus).is_err());
    }

    /// The test binary itself is a dynamically linked ELF64 with libc among its needs.
    #[test]
    fn reads_needed_libraries_of_this_test_binary() {
        let Ok(path) = std::env::current_exe() else {
            return;
        };
        let bytes = std::fs::read(path).unwrap();
        let elf = ElfFile::parse(&bytes).unwrap();
        let needed = elf.needed_libraries().unwrap();
        assert!(
            needed.iter().any(|name| name.starts_with("libc.so")),
            "{needed:?}"
        );
        assert!(elf.section(".text").unwrap().is_some());
        assert!(elf.section(".no-such-section").unwrap().is_none());
    }
}
