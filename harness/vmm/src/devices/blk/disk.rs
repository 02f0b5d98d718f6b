//! The disk behind the virtio-blk: a file or a block device, opened buffered or with
//! O_DIRECT, and the requests the device checked, executed on it. Data moves between the
//! disk and guest RAM with preadv/pwritev straight into the guest's buffers; with O_DIRECT,
//! buffers that are not 4 KiB-aligned go through an aligned bounce buffer.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestMemoryBackend};
use workloads::virtio_blk::{ID_LEN, SECTOR_SIZE};

use super::request::{Kind, Request, Segment};
use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// Alignment of buffer addresses, lengths and offsets O_DIRECT is given (4 KiB covers
/// every logical block size in use).
const DIRECT_ALIGN: u64 = 4096;

/// The disk a VM is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// A regular file or a block device, read and written in place.
    pub path: PathBuf,
    /// Opened with O_DIRECT (the host's page cache bypassed).
    pub direct: bool,
}

/// Why a request failed on the disk.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiskError {
    #[error("{op} of {len} bytes at byte {offset} of the disk: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("{op} of {len} bytes at byte {offset} of the disk moved only {done}")]
    Short {
        op: &'static str,
        offset: u64,
        len: u64,
        done: u64,
    },
    #[error("a buffer at {0:#x} is no longer inside guest RAM")]
    Memory(u64),
}

#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    direct: bool,
    capacity_sectors: u64,
    /// Bounce buffer for unaligned O_DIRECT requests (allocated on first use).
    bounce: Vec<u8>,
}

/// The identification string `GET_ID` returns (NUL-padded).
pub(crate) const DISK_ID: &[u8] = b"hvbench-virtio-blk";

impl Disk {
    pub(crate) fn open(config: &DiskConfig) -> std::io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if config.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(&config.path)?;
        // The end of a block device is its size, as for a file.
        let bytes = file.seek(SeekFrom::End(0))?;
        Ok(Disk {
            file,
            direct: config.direct,
            capacity_sectors: bytes / SECTOR_SIZE,
            bounce: Vec::new(),
        })
    }

    pub(crate) fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Carries out a checked request; the bytes it wrote into guest buffers.
    pub(crate) fn execute(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
    ) -> Result<u32, DiskError> {
        match request.kind {
            Kind::Read => {
                self.transfer(mem, request, false)?;
                // At most MAX_REQUEST_BYTES (1 MiB): fits.
                Ok(u32::try_from(request.data_len).unwrap_or(u32::MAX))
            }
            Kind::Write => self.transfer(mem, request, true).map(|_| 0),
            Kind::Flush => self
                .file
                .sync_data()
                .map(|_| 0)
                .map_err(|source| DiskError::Io {
                    op: "fdatasync",
                    offset: 0,
                    len: 0,
                    source,
                }),
            Kind::GetId => {
                let mut id = [0u8; ID_LEN as usize];
                id[..DISK_ID.len()].copy_from_slice(DISK_ID);
                let first = request.data[0];
                let n = id.len().min(first.len as usize);
                mem.write_slice(&id[..n], first.addr)
                    .map_err(|_| DiskError::Memory(first.addr.0))?;
                Ok(u32::try_from(n).unwrap_or(0))
            }
        }
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Whether the request's buffers and offset suit the file's mode as they are.
    pub(crate) fn aligned(&self, request: &Request) -> bool {
        !self.direct
            || (request.offset.is_multiple_of(DIRECT_ALIGN)
                && request.data.iter().all(|s| {
                    s.addr.0.is_multiple_of(DIRECT_ALIGN)
                        && u64::from(s.len).is_multiple_of(DIRECT_ALIGN)
                }))
    }

    fn transfer(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
        write: bool,
    ) -> Result<(), DiskError> {
        if self.aligned(request) {
            return self.vectored(mem, request, write);
        }
        self.bounced(mem, request, write)
    }

    /// preadv/pwritev straight between the disk and the guest's buffers.
    fn vectored(&self, mem: &GuestMemory, request: &Request, write: bool) -> Result<(), DiskError> {
        let mut slices = Vec::with_capacity(request.data.len());
        for s in &request.data {
            let slice = mem
                .get_slice(s.addr, s.len as usize)
                .map_err(|_| DiskError::Memory(s.addr.0))?;
            slices.push(slice);
        }
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(&request.data)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len as usize,
            })
            .collect();
        let op = if write { "pwritev" } else { "preadv" };
        let count = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
        let offset = libc::off_t::try_from(request.offset).unwrap_or(libc::off_t::MAX);
        // SAFETY: each iovec covers one buffer inside the guest RAM mapping (vm-memory
        // checked the range), kept mapped by `mem` and the guards for the call. The kernel
        // reads from them (pwritev) or writes into them (preadv); nothing in the VMM holds a
        // Rust reference into guest RAM.
        let done = unsafe {
            if write {
                libc::pwritev(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset)
            } else {
                libc::preadv(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset)
            }
        };
        if !write {
            mark_read(mem, request);
        }
        self.check_done(op, request, done)
    }

    fn check_done(
        &self,
        op: &'static str,
        request: &Request,
        done: isize,
    ) -> Result<(), DiskError> {
        let (offset, len) = (request.offset, request.data_len);
        match u64::try_from(done) {
            Ok(done) if done == len => Ok(()),
            Ok(done) => Err(DiskError::Short {
                op,
                offset,
                len,
                done,
            }),
            Err(_) => Err(DiskError::Io {
                op,
                offset,
                len,
                source: std::io::Error::last_os_error(),
            }),
        }
    }

    /// Through a 4 KiB-aligned bounce buffer (O_DIRECT with unaligned guest buffers).
    fn bounced(
        &mut self,
        mem: &GuestMemory,
        request: &Request,
        write: bool,
    ) -> Result<(), DiskError> {
        let len = u64_to_usize(request.data_len);
        let align = u64_to_usize(DIRECT_ALIGN);
        let padded = len.next_multiple_of(align);
        if self.bounce.len() < padded + align {
            self.bounce = vec![0u8; padded + align];
        }
        let start = self.bounce.as_ptr().align_offset(align);
        let fd = self.file.as_raw_fd();
        let offset = libc::off_t::try_from(request.offset).unwrap_or(libc::off_t::MAX);
        let buf = &mut self.bounce[start..start + padded];
        if write {
            gather(mem, &request.data, &mut buf[..len])?;
        }
        // SAFETY: `buf` is `padded` bytes of our own buffer, aligned to 4 KiB; the kernel
        // reads or writes only those bytes.
        let done = unsafe {
            if write {
                libc::pwrite(fd, buf.as_ptr().cast(), len, offset)
            } else {
                libc::pread(fd, buf.as_mut_ptr().cast(), len, offset)
            }
        };
        let op = if write { "pwrite" } else { "pread" };
        self.check_done(op, request, done)?;
        if !write {
            let buf = &self.bounce[start..start + len];
            scatter(mem, &request.data, buf)?;
        }
        Ok(())
    }
}

fn gather(mem: &GuestMemory, segments: &[Segment], out: &mut [u8]) -> Result<(), DiskError> {
    let mut at = 0;
    for s in segments {
        let n = s.len as usize;
        mem.read_slice(&mut out[at..at + n], s.addr)
            .map_err(|_| DiskError::Memory(s.addr.0))?;
        at += n;
    }
    Ok(())
}

fn scatter(mem: &GuestMemory, segments: &[Segment], data: &[u8]) -> Result<(), DiskError> {
    let mut at = 0;
    for s in segments {
        let n = s.len as usize;
        mem.write_slice(&data[at..at + n], s.addr)
            .map_err(|_| DiskError::Memory(s.addr.0))?;
        at += n;
    }
    Ok(())
}

/// The kernel wrote a read's data into guest RAM behind vm-memory's back: its pages are
/// marked dirty for a migration (whatever the read returned: it may have written some).
pub(crate) fn mark_read(mem: &GuestMemory, request: &Request) {
    for s in &request.data {
        crate::vstate::memory::mark_dirty(mem, s.addr, s.len as usize);
    }
}
