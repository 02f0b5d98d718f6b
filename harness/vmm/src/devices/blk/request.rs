//! One virtio-blk request, read from a descriptor chain and checked whole before the disk
//! is touched: the header (device-readable, 16 bytes), the data buffers (all
//! device-writable for a read, all device-readable for a write, each inside guest RAM,
//! whole sectors, at most [`MAX_REQUEST_BYTES`] in all), the sectors (inside the disk)
//! and the status byte (device-writable, inside guest RAM, last).

use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use workloads::virtio_blk::{
    HEADER_LEN, ID_LEN, MAX_REQUEST_BYTES, SECTOR_SIZE, SEG_MAX, S_IOERR, S_UNSUPP, T_FLUSH,
    T_GET_ID, T_IN, T_OUT,
};

use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// Most descriptors a chain may have: header, `SEG_MAX` data buffers, status.
pub(crate) const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// What a request asks of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    GetId,
}

/// One buffer of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) kind: Kind,
    /// First byte on the disk (sector x 512).
    pub(crate) offset: u64,
    pub(crate) data: Vec<Segment>,
    pub(crate) data_len: u64,
    /// The status byte.
    pub(crate) status: GuestAddress,
}

/// Why a request was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub(crate) enum RequestError {
    #[error(
        "the descriptor chain from head {head} is broken (a next index outside the queue, an \
         unreadable or nested indirect table, a loop, or more than {MAX_DESCRIPTORS} descriptors)"
    )]
    BrokenChain { head: u16 },
    #[error("the chain from head {head} has no device-writable status byte inside guest RAM last")]
    NoStatus { head: u16 },
    #[error("the request header at {addr:#x} ({len} bytes) is not a device-readable 16-byte buffer inside guest RAM")]
    BadHeader { addr: u64, len: u32 },
    #[error("request type {kind} is not supported")]
    Unsupported { kind: u32 },
    #[error(
        "a data buffer at {addr:#x} ({len} bytes) has the wrong direction for a {kind:?} (device-{})",
        if *writable { "writable" } else { "readable" }
    )]
    WrongDirection {
        kind: Kind,
        addr: u64,
        len: u32,
        writable: bool,
    },
    #[error("a data buffer at {addr:#x} ({len} bytes) is empty or outside guest RAM")]
    BufferOutsideRam { addr: u64, len: u32 },
    #[error("{len} bytes of data is not a whole number of 512-byte sectors, or is none")]
    RaggedLength { len: u64 },
    #[error("{len} bytes of data is more than the {MAX_REQUEST_BYTES} a request may carry")]
    Oversized { len: u64 },
    #[error("sectors {sector}.. ({len} bytes) reach past the disk's {capacity} sectors")]
    OutsideDisk {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("a {kind:?} request carries {len} bytes of data it may not have")]
    UnexpectedData { kind: Kind, len: u64 },
}

impl RequestError {
    /// The status byte the driver gets for it (where the chain has one).
    pub(crate) fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported { .. } => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// A refused request whose status byte can still be written (or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) error: RequestError,
    pub(crate) status: Option<GuestAddress>,
}

type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemory>;

/// Collects the chain's descriptors, refusing a chain that is cut or too long.
fn descriptors(chain: Chain) -> Result<Vec<virtio_queue::desc::split::Descriptor>, RequestError> {
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut continues = false;
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(RequestError::BrokenChain { head });
        }
        continues = d.has_next();
        descs.push(d);
    }
    // The crate ends a chain quietly where it breaks: a last descriptor that still points
    // on, or none at all, means it was cut.
    if descs.is_empty() || continues {
        return Err(RequestError::BrokenChain { head });
    }
    Ok(descs)
}

fn in_ram(mem: &GuestMemory, addr: GuestAddress, len: u64) -> bool {
    len > 0 && GuestMemoryBackend::check_range(mem, addr, u64_to_usize(len))
}

/// Reads and checks the request `chain` carries, for a disk of `capacity` sectors.
pub(crate) fn parse(mem: &GuestMemory, chain: Chain, capacity: u64) -> Result<Request, Refused> {
    let head = chain.head_index();
    let no_status = |error| Refused {
        error,
        status: None,
    };
    let descs = descriptors(chain).map_err(no_status)?;
    let last = descs[descs.len() - 1];
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()).saturating_sub(1))
        .filter(|_| descs.len() >= 2 && last.is_write_only())
        .filter(|a| in_ram(mem, *a, 1))
        .ok_or(no_status(RequestError::NoStatus { head }))?;
    let refuse = |error| Refused {
        error,
        status: Some(status_addr),
    };
    let header = descs[0];
    let (kind, offset) = read_header(mem, &header).map_err(refuse)?;
    let data = &descs[1..descs.len() - 1];
    let (segments, data_len) = check_data(mem, kind, data).map_err(refuse)?;
    check_extent(kind, offset, data_len, capacity).map_err(refuse)?;
    Ok(Request {
        kind,
        offset,
        data: segments,
        data_len,
        status: status_addr,
    })
}

fn read_header(
    mem: &GuestMemory,
    header: &virtio_queue::desc::split::Descriptor,
) -> Result<(Kind, u64), RequestError> {
    let bad = RequestError::BadHeader {
        addr: header.addr().raw_value(),
        len: header.len(),
    };
    if header.is_write_only() || header.len() != HEADER_LEN {
        return Err(bad);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr()).map_err(|_| bad)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector);
    let kind = match kind {
        T_IN => Kind::Read,
        T_OUT => Kind::Write,
        T_FLUSH => Kind::Flush,
        T_GET_ID => Kind::GetId,
        other => return Err(RequestError::Unsupported { kind: other }),
    };
    // A sector past what a byte offset can hold is outside any disk.
    let offset = sector.saturating_mul(SECTOR_SIZE);
    Ok((kind, offset))
}

fn check_data(
    mem: &GuestMemory,
    kind: Kind,
    data: &[virtio_queue::desc::split::Descriptor],
) -> Result<(Vec<Segment>, u64), RequestError> {
    let mut segments = Vec::with_capacity(data.len());
    let mut total = 0u64;
    for d in data {
        let (addr, len) = (d.addr().raw_value(), d.len());
        let wants_writable = matches!(kind, Kind::Read | Kind::GetId);
        if matches!(kind, Kind::Read | Kind::Write | Kind::GetId)
            && d.is_write_only() != wants_writable
        {
            return Err(RequestError::WrongDirection {
                kind,
                addr,
                len,
                writable: d.is_write_only(),
            });
        }
        if !in_ram(mem, d.addr(), u64::from(len)) {
            return Err(RequestError::BufferOutsideRam { addr, len });
        }
        total += u64::from(len);
        if total > u64::from(MAX_REQUEST_BYTES) {
            return Err(RequestError::Oversized { len: total });
        }
        segments.push(Segment {
            addr: d.addr(),
            len,
        });
    }
    Ok((segments, total))
}

fn check_extent(kind: Kind, offset: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    match kind {
        Kind::Read | Kind::Write => {
            if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::RaggedLength { len });
            }
            let end = offset.checked_add(len);
            if end.is_none_or(|end| end > capacity.saturating_mul(SECTOR_SIZE)) {
                return Err(RequestError::OutsideDisk {
                    sector: offset / SECTOR_SIZE,
                    len,
                    capacity,
                });
            }
            Ok(())
        }
        Kind::Flush if len > 0 => Err(RequestError::UnexpectedData { kind, len }),
        Kind::GetId if len < u64::from(ID_LEN) => Err(RequestError::RaggedLength { len }),
        Kind::Flush | Kind::GetId => Ok(()),
    }
}
