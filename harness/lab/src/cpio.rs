//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Every entry is owned by root and dated 0, so the same inputs give the same archive.

use std::io::{self, Write};

const NEWC_MAGIC: &str = "070701";
const TRAILER_NAME: &str = "TRAILER!!!";

const FILE_TYPE_DIRECTORY: u32 = 0o040000;
const FILE_TYPE_REGULAR: u32 = 0o100000;
const FILE_TYPE_SYMLINK: u32 = 0o120000;
const FILE_TYPE_CHAR_DEVICE: u32 = 0o020000;
const PERMISSION_BITS: u32 = 0o7777;

/// Writes entries one after another; parents must be written before their children.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    bytes_written: u64,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    data_len: usize,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        Self {
            out,
            // Inode 0 is left to the trailer, as GNU cpio does.
            next_inode: 1,
            bytes_written: 0,
        }
    }

    pub(crate) fn directory(&mut self, name: &str, permissions: u32) -> io::Result<()> {
        let mode = FILE_TYPE_DIRECTORY | (permissions & PERMISSION_BITS);
        self.entry(
            Header {
                name,
                mode,
                nlink: 2,
                data_len: 0,
                rdev: (0, 0),
            },
            &[],
        )
    }

    pub(crate) fn file(&mut self, name: &str, permissions: u32, data: &[u8]) -> io::Result<()> {
        let mode = FILE_TYPE_REGULAR | (permissions & PERMISSION_BITS);
        self.entry(
            Header {
                name,
                mode,
                nlink: 1,
                data_len: data.len(),
                rdev: (0, 0),
            },
            data,
        )
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let mode = FILE_TYPE_SYMLINK | 0o777;
        self.entry(
            Header {
                name,
                mode,
                nlink: 1,
                data_len: target.len(),
                rdev: (0, 0),
            },
            target.as_bytes(),
        )
    }

    pub(crate) fn char_device(
        &mut self,
        name: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let mode = FILE_TYPE_CHAR_DEVICE | (permissions & PERMISSION_BITS);
        self.entry(
            Header {
                name,
                mode,
                nlink: 1,
                data_len: 0,
                rdev: (major, minor),
            },
            &[],
        )
    }

    /// Writes the trailer and hands back the underlying writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.write_header(
            0,
            &Header {
                name: TRAILER_NAME,
                mode: 0,
                nlink: 1,
                data_len: 0,
                rdev: (0, 0),
            },
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, header: Header<'_>, data: &[u8]) -> io::Result<()> {
        validate_name(header.name)?;
        let inode = self.next_inode;
        self.next_inode = self.next_inode.wrapping_add(1);
        self.write_header(inode, &header)?;
        self.write_padded(data)
    }

    fn write_header(&mut self, inode: u32, header: &Header<'_>) -> io::Result<()> {
        let data_len = u32::try_from(header.data_len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: newc cpio entries are limited to 4 GiB", header.name),
            )
        })?;
        // The name size counts the terminating NUL.
        let name_size = header.name.len() + 1;
        let name_size = u32::try_from(name_size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
        let fields = [
            inode,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime: fixed, for reproducible archives
            data_len,
            0, // devmajor
            0, // devminor
            header.rdev.0,
            header.rdev.1,
            name_size,
            0, // check (only used by the "crc" variant)
        ];
        let mut text = String::with_capacity(110 + header.name.len() + 4);
        text.push_str(NEWC_MAGIC);
        for field in fields {
            text.push_str(&format!("{field:08x}"));
        }
        text.push_str(header.name);
        text.push('\0');
        self.write_padded(text.as_bytes())
    }

    /// Header+name and data are each padded to a multiple of four bytes.
    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.bytes_written += bytes.len() as u64;
        let padding = (4 - (self.bytes_written % 4)) % 4;
        self.out.write_all(&[0u8; 3][..padding as usize])?;
        self.bytes_written += padding;
        Ok(())
    }
}

fn validate_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('\0') || name.starts_with('/') || name == TRAILER_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid cpio entry name {name:?} (relative, non-empty, no NUL)"),
        ));
    }
    Ok(())
}

/// One entry read back from a newc archive.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer.
#[cfg(test)]
pub(crate) fn parse_newc(archive: &[u8]) -> Result<Vec<CpioEntry>, String> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let header = archive
            .get(offset..offset + 110)
            .ok_or_else(|| format!("truncated header at {offset}"))?;
        if &header[..6] != NEWC_MAGIC.as_bytes() {
            return Err(format!("bad magic at {offset}"));
        }
        let field = |index: usize| -> Result<u32, String> {
            let start = 6 + index * 8;
            let text = std::str::from_utf8(&header[start..start + 8])
                .map_err(|_| format!("non-ASCII header at {offset}"))?;
            u32::from_str_radix(text, 16).map_err(|_| format!("bad hex field at {offset}"))
        };
        let mode = field(1)?;
        let data_len = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let name_size = field(11)? as usize;
        let name_start = offset + 110;
        let name_bytes = archive
            .get(name_start..name_start + name_size.saturating_sub(1))
            .ok_or_else(|| format!("truncated name at {offset}"))?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| format!("non-UTF-8 name at {offset}"))?;
        let data_start = (name_start + name_size).next_multiple_of(4);
        if name == TRAILER_NAME {
            return Ok(entries);
        }
        let data = archive
            .get(data_start..data_start + data_len)
            .ok_or_else(|| format!("truncated data for {name}"))?
            .to_vec();
        offset = (data_start + data_len).next_multiple_of(4);
        entries.push(CpioEntry {
            name,
            mode,
            rdev,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_archive() -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("bin", 0o755).unwrap();
        writer
            .file("bin/tool", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        writer.symlink("init", "bin/tool").unwrap();
        writer.char_device("console", 0o600, 5, 1).unwrap();
        writer.file("empty", 0o644, b"").unwrap();
        writer.finish().unwrap()
    }

    #[test]
    fn round_trip_through_own_parser() {
        let archive = sample_archive();
        assert_eq!(archive.len() % 4, 0);
        let entries = parse_newc(&archive).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/tool", "init", "console", "empty"]);
        assert_eq!(entries[0].mode, 0o040755);
        assert_eq!(entries[1].mode, 0o100755);
        assert_eq!(entries[1].data, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[2].mode, 0o120777);
        assert_eq!(entries[2].data, b"bin/tool");
        assert_eq!(entries[3].rdev, (5, 1));
        assert!(entries[4].data.is_empty());
    }

    #[test]
    fn identical_inputs_give_identical_archives() {
        assert_eq!(sample_archive(), sample_archive());
    }

    #[test]
    fn rejects_bad_names() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.file("/abs", 0o644, b"").is_err());
        assert!(writer.file("", 0o644, b"").is_err());
        assert!(writer.file("a\0b", 0o644, b"").is_err());
        assert!(writer.file(TRAILER_NAME, 0o644, b"").is_err());
    }

    /// GNU cpio, when installed, must list the same names.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            hostutil::say!("cpio not installed; skipping");
            return;
        };
        let archive = sample_archive();
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&archive).unwrap();
        }
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let listing = String::from_utf8(output.stdout).unwrap();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(names, ["bin", "bin/tool", "init", "console", "empty"]);
    }
}
