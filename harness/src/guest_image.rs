//! The guest image: the ELF built from guests/ and embedded in this binary, or one given
//! with `--guest`. Checked before any backend sees it, so a missing, truncated or foreign
//! file is one clear error instead of a failure deep inside a loader.

use std::borrow::Cow;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The image built by harness/build.rs from guests/.
static EMBEDDED: &[u8] = include_bytes!(env!("HVBENCH_GUEST_ELF"));

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Largest image accepted: the real one is well under 1 MiB.
const MAX_IMAGE_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read guest image {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest image {path} is more than the {MAX_IMAGE_BYTES} bytes accepted")]
    TooLarge { path: PathBuf },
    #[error("guest image {path} is not a regular file (it is {kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("guest image {origin} is not an ELF file (bad magic)")]
    NotElf { origin: String },
    #[error("guest image {origin} is not a 64-bit little-endian x86-64 executable")]
    WrongKind { origin: String },
    #[error("guest image {origin} is truncated or corrupt: {what}")]
    Corrupt { origin: String, what: &'static str },
    #[error("guest image {origin} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry { origin: String },
    #[error("guest image {origin} loads outside 1 MiB..3 GiB (segment at {paddr:#x}+{size:#x})")]
    BadSegment {
        origin: String,
        paddr: u64,
        size: u64,
    },
}

/// A checked guest image.
#[derive(Clone, Debug)]
pub struct GuestImage {
    bytes: Cow<'static, [u8]>,
    sha256: String,
    pvh_entry: u32,
    /// Highest guest-physical address the image occupies (end of its last segment).
    load_end: u64,
}

impl GuestImage {
    /// The image embedded at build time.
    pub fn embedded() -> Result<Self, ImageError> {
        Self::check(Cow::Borrowed(EMBEDDED), "(embedded)".to_string())
    }

    /// An image from a file: a regular file of at most [`MAX_IMAGE_BYTES`]. A device
    /// (`/dev/zero`) or a FIFO is refused before anything is read.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let read_error = |source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking, so that opening a FIFO does not wait for a writer; the type is
        // checked on what was opened, not on a name that may change in between.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(ImageError::NotRegular {
                path: path.to_path_buf(),
                kind: describe(metadata.file_type()),
            });
        }
        if metadata.len() > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let bytes = read_bounded(file, MAX_IMAGE_BYTES)
            .map_err(read_error)?
            .ok_or_else(|| ImageError::TooLarge {
                path: path.to_path_buf(),
            })?;
        Self::check(Cow::Owned(bytes), path.display().to_string())
    }

    /// `--guest PATH` if given, else the embedded image.
    pub fn load(path: Option<&Path>) -> Result<Self, ImageError> {
        match path {
            Some(p) => Self::from_file(p),
            None => Self::embedded(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn pvh_entry(&self) -> u32 {
        self.pvh_entry
    }

    pub fn load_end(&self) -> u64 {
        self.load_end
    }

    /// Writes the image to `dir` (for backends that take a path) and returns the path.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("hvbench-guest-{}.elf", &self.sha256[..12]));
        std::fs::write(&path, self.bytes())?;
        Ok(path)
    }

    fn check(bytes: Cow<'static, [u8]>, origin: String) -> Result<Self, ImageError> {
        let (pvh_entry, load_end) = parse(&bytes, &origin)?;
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(GuestImage {
            bytes,
            sha256,
            pvh_entry,
            load_end,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    origin: &'a str,
}

impl Reader<'_> {
    fn slice(&self, offset: u64, len: u64, what: &'static str) -> Result<&[u8], ImageError> {
        let start = usize::try_from(offset).ok();
        let end = offset
            .checked_add(len)
            .and_then(|e| usize::try_from(e).ok());
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() => Ok(&self.bytes[s..e]),
            _ => Err(ImageError::Corrupt {
                origin: self.origin.to_string(),
                what,
            }),
        }
    }

    fn u16(&self, offset: u64, what: &'static str) -> Result<u16, ImageError> {
        let b = self.slice(offset, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, offset: u64, what: &'static str) -> Result<u32, ImageError> {
        let b = self.slice(offset, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, offset: u64, what: &'static str) -> Result<u64, ImageError> {
        let b = self.slice(offset, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Checks the ELF header, the program headers and the PVH note, with every offset
/// bounds-checked. Returns the PVH entry and the end of the loaded image.
/// What a file that is not a regular file is, for the error.
fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Reads everything from `reader` if it holds at most `limit` bytes; `None` if it holds
/// more (a file that grew after it was opened), having read only `limit + 1`.
fn read_bounded(reader: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

fn parse(bytes: &[u8], origin: &str) -> Result<(u32, u64), ImageError> {
    let r = Reader { bytes, origin };
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(ImageError::NotElf {
            origin: origin.to_string(),
        });
    }
    let header = r.slice(0, 64, "ELF header")?;
    // ELFCLASS64, little-endian, ET_EXEC, EM_X86_64.
    if header[4] != 2
        || header[5] != 1
        || r.u16(16, "e_type")? != 2
        || r.u16(18, "e_machine")? != 62
    {
        return Err(ImageError::WrongKind {
            origin: origin.to_string(),
        });
    }
    let phoff = r.u64(32, "e_phoff")?;
    let phentsize = r.u16(54, "e_phentsize")? as u64;
    let phnum = r.u16(56, "e_phnum")? as u64;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(ImageError::Corrupt {
            origin: origin.to_string(),
            what: "program header table",
        });
    }
    let mut entry = None;
    let mut load_end = 0u64;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        r.slice(ph, 56, "program header")?;
        let kind = r.u32(ph, "p_type")?;
        let offset = r.u64(ph + 8, "p_offset")?;
        let paddr = r.u64(ph + 24, "p_paddr")?;
        let filesz = r.u64(ph + 32, "p_filesz")?;
        let memsz = r.u64(ph + 40, "p_memsz")?;
        match kind {
            PT_LOAD => {
                r.slice(offset, filesz, "segment data beyond end of file")?;
                let end = paddr.checked_add(memsz);
                if paddr < 0x10_0000
                    || end.is_none_or(|e| e > workloads::abi::MAX_LOW_RAM)
                    || filesz > memsz
                {
                    return Err(ImageError::BadSegment {
                        origin: origin.to_string(),
                        paddr,
                        size: memsz,
                    });
                }
                load_end = load_end.max(end.unwrap_or(0));
            }
            PT_NOTE => {
                let notes = r.slice(offset, filesz, "note segment")?;
                if let Some(e) = find_pvh_entry(notes) {
                    entry = Some(e);
                }
            }
            _ => {}
        }
    }
    let entry = entry.ok_or_else(|| ImageError::NoPvhEntry {
        origin: origin.to_string(),
    })?;
    Ok((entry, load_end))
}

/// Walks ELF notes for ("Xen", PHYS32_ENTRY) and returns its 32-bit address.
fn find_pvh_entry(mut notes: &[u8]) -> Option<u32> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let namesz = u32::from_le_bytes(notes[0..4].try_into().ok()?) as usize;
        let descsz = u32::from_le_bytes(notes[4..8].try_into().ok()?) as usize;
        let kind = u32::from_le_bytes(notes[8..12].try_into().ok()?);
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        let name = &notes[12..12 + namesz];
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
            return Some(u32::from_le_bytes(
                notes[name_end..name_end + 4].try_into().ok()?,
            ));
        }
        notes = &notes[desc_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_image_is_a_pvh_elf() {
        let image = GuestImage::embedded().unwrap();
        assert_eq!(image.pvh_entry(), 0x10_0000);
        assert_eq!(image.sha256().len(), 64);
        assert!(image.load_end() > 0x10_0000);
    }

    /// `GuestImage::from_file`, failing the test if it does not return within seconds.
    fn load_promptly(path: &Path) -> Result<GuestImage, ImageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(GuestImage::from_file(&path));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading returns within seconds")
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let e = load_promptly(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::NotRegular {
                    kind: "a character device",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("/dev/zero"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let e = GuestImage::from_file(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::NotRegular { .. }), "{e}");

        // A FIFO with no writer: refused at once, not waited on.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = load_promptly(&fifo).unwrap_err();
        assert!(
            matches!(e, ImageError::NotRegular { kind: "a FIFO", .. }),
            "{e}"
        );

        // One byte over the limit (sparse: nothing is written).
        let big = dir.path().join("big.elf");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_IMAGE_BYTES + 1)
            .unwrap();
        let e = load_promptly(&big).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn the_read_stops_at_the_limit() {
        let endless = std::io::repeat(0);
        assert_eq!(read_bounded(endless, 1000).unwrap(), None);
        let exact = read_bounded(&[7u8; 1000][..], 1000).unwrap().unwrap();
        assert_eq!(exact.len(), 1000);
    }

    #[test]
    fn corrupt_images_are_clear_errors() {
        let good = GuestImage::embedded().unwrap().bytes().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };

        let missing = dir.path().join("missing.elf");
        let e = GuestImage::from_file(&missing).unwrap_err();
        assert!(matches!(e, ImageError::Read { .. }));
        assert!(e.to_string().contains("missing.elf"), "{e}");

        let e = GuestImage::from_file(&write("text", b"hello world, not an ELF")).unwrap_err();
        assert!(matches!(e, ImageError::NotElf { .. }), "{e}");

        let e = GuestImage::from_file(&write("empty", b"")).unwrap_err();
        assert!(matches!(e, ImageError::NotElf { .. }), "{e}");

        let e = GuestImage::from_file(&write("short", &good[..40])).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");

        // Cut in the middle of the segment data.
        let e = GuestImage::from_file(&write("truncated", &good[..good.len() / 3])).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");

        let mut elf32 = good.clone();
        elf32[4] = 1;
        let e = GuestImage::from_file(&write("elf32", &elf32)).unwrap_err();
        assert!(matches!(e, ImageError::WrongKind { .. }), "{e}");

        // A host program: a valid ELF, but no PVH guest.
        let host_binary = std::path::Path::new("/bin/true");
        let e = GuestImage::from_file(host_binary).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::NoPvhEntry { .. }
                    | ImageError::WrongKind { .. }
                    | ImageError::BadSegment { .. }
            ),
            "{e}"
        );

        // Random garbage after a valid magic never panics.
        let mut state = 0x1234_5678u32;
        for round in 0..200 {
            let mut noisy = good.clone();
            for _ in 0..16 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let at = 4 + (state as usize % 250);
                noisy[at] = (state >> 8) as u8;
            }
            let _ = GuestImage::from_file(&write(&format!("noisy{round}"), &noisy));
        }
    }
}
