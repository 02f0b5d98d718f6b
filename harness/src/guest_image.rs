//! The guest image: the ELF built from guests/ and embedded in this binary, or one given
//! with `--guest`. Checked before any backend sees it, so a missing, truncated or foreign
//! file is one clear error instead of a failure deep inside a loader.

use std::borrow::Cow;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use goblin::elf::header::{ELFCLASS64, ELFDATA2LSB, EM_X86_64, ET_EXEC};
use goblin::elf::program_header::PT_LOAD;
use goblin::elf::Elf;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The image built by harness/build.rs from guests/.
static EMBEDDED: &[u8] = include_bytes!(env!("HVBENCH_GUEST_ELF"));

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers accepted (the real image has a handful).
const MAX_PROGRAM_HEADERS: usize = 64;
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
    Corrupt { origin: String, what: String },
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

/// Checks the ELF header, the program headers and the PVH note (goblin reads them with
/// every offset bounds-checked). Returns the PVH entry and the end of the loaded image.
fn parse(bytes: &[u8], origin: &str) -> Result<(u32, u64), ImageError> {
    let corrupt = |what: String| ImageError::Corrupt {
        origin: origin.to_string(),
        what,
    };
    let wrong_kind = || ImageError::WrongKind {
        origin: origin.to_string(),
    };
    if !bytes.starts_with(b"\x7fELF") {
        return Err(ImageError::NotElf {
            origin: origin.to_string(),
        });
    }
    // ELFCLASS64 and little-endian, before the parser reads the rest as such.
    if bytes.len() >= 6 && (bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB) {
        return Err(wrong_kind());
    }
    let elf = Elf::parse(bytes).map_err(|e| corrupt(e.to_string()))?;
    if elf.header.e_type != ET_EXEC || elf.header.e_machine != EM_X86_64 {
        return Err(wrong_kind());
    }
    if elf.program_headers.is_empty() || elf.program_headers.len() > MAX_PROGRAM_HEADERS {
        return Err(corrupt("program header table".into()));
    }
    let mut load_end = 0u64;
    for ph in elf.program_headers.iter().filter(|ph| ph.p_type == PT_LOAD) {
        let in_file = usize::try_from(ph.p_offset)
            .ok()
            .zip(usize::try_from(ph.p_filesz).ok())
            .and_then(|(start, len)| bytes.get(start..start.checked_add(len)?));
        if in_file.is_none() {
            return Err(corrupt("segment data beyond end of file".into()));
        }
        let end = ph.p_paddr.checked_add(ph.p_memsz);
        if ph.p_paddr < 0x10_0000
            || end.is_none_or(|e| e > workloads::abi::MAX_LOW_RAM)
            || ph.p_filesz > ph.p_memsz
        {
            return Err(ImageError::BadSegment {
                origin: origin.to_string(),
                paddr: ph.p_paddr,
                size: ph.p_memsz,
            });
        }
        load_end = load_end.max(end.unwrap_or(0));
    }
    let entry = pvh_entry(&elf, bytes).ok_or_else(|| ImageError::NoPvhEntry {
        origin: origin.to_string(),
    })?;
    Ok((entry, load_end))
}

/// The 32-bit address of the ("Xen", PHYS32_ENTRY) note, from the note segments.
fn pvh_entry(elf: &Elf, bytes: &[u8]) -> Option<u32> {
    elf.iter_note_headers(bytes)?
        .filter_map(Result::ok)
        .find(|n| n.n_type == XEN_ELFNOTE_PHYS32_ENTRY && n.name == "Xen")
        .and_then(|n| n.desc.get(..4)?.try_into().ok())
        .map(u32::from_le_bytes)
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
                noisy[at] = ((state >> 8) & 0xff) as u8;
            }
            let _ = GuestImage::from_file(&write(&format!("noisy{round}"), &noisy));
        }
    }
}
