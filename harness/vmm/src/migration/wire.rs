//! The migration stream: a sequence of chunks, each framed as
//!
//! ```text
//! kind u8 | 0 u8 x3 | payload length u32 LE | CRC-32 u32 LE | payload
//! ```
//!
//! where the CRC-32 (IEEE) covers the first 8 header bytes and the payload. The first
//! chunk is [`Hello`] (magic, [`VERSION`], page size, RAM size, the machine); then page
//! runs, rounds, the machine state and `Done`. The switchover is a handshake in which at
//! most one side ever runs the guest: the destination builds the VM and answers `Ready`
//! (or `Refuse`, why not) without running it; the source then sends `Go` and never runs
//! the guest again; the destination starts it only on `Go`, and answers `Ack`. Everything read is bounded before it is allocated or used: a
//! payload is at most [`MAX_PAYLOAD`] bytes, a page run names pages inside the RAM the
//! `Hello` announced, and an unknown kind, a wrong length or a checksum mismatch is an
//! error, never a panic.

use std::io::{self, Read, Write};

use thiserror::Error;

/// "HVBMIG" and two zero bytes.
pub const MAGIC: [u8; 8] = *b"HVBMIG\0\0";
/// Bumped whenever the layout of any chunk changes; a peer with another is refused.
pub const VERSION: u32 = 3;
pub const PAGE_SIZE: u64 = 4096;
const PAGE_BYTES: usize = 4096;
/// Most pages in one run (1 MiB of data).
pub const MAX_RUN_PAGES: u32 = 256;
const RUN_HEADER: usize = 16;
/// The largest payload a reader accepts: a full page run, or the machine state.
pub const MAX_PAYLOAD: usize = RUN_HEADER + MAX_RUN_PAGES as usize * PAGE_BYTES;
const FRAME: usize = 12;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("the stream ended inside a chunk (truncated after {0} bytes of it)")]
    Truncated(usize),
    #[error("the stream ended before the chunk that was due")]
    Ended,
    #[error("reading the stream: {0}")]
    Io(#[source] io::Error),
    #[error("chunk kind {0:#x} is unknown")]
    UnknownKind(u8),
    #[error("chunk of {len} bytes is over the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error(
        "checksum mismatch on a {kind:?} chunk: stored {stored:#010x}, computed {computed:#010x}"
    )]
    Checksum {
        kind: Kind,
        stored: u32,
        computed: u32,
    },
    #[error("not an hvbench migration stream (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("migration stream version {found}, this VMM speaks {VERSION}")]
    Version { found: u32 },
    #[error("malformed {kind:?} chunk: {detail}")]
    Malformed { kind: Kind, detail: String },
    #[error("expected a {expected} chunk, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
}

/// What a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    /// Pages with their contents: first page frame u64, count u32, 0 u32, the bytes.
    Pages = 2,
    /// Pages that are all zero: first page frame u64, count u32, 0 u32.
    Zeros = 3,
    /// The end of one pre-copy round: round u32, 0 u32, pages sent u64.
    RoundEnd = 4,
    /// The vCPU and device state (see `state.rs`).
    State = 5,
    /// Nothing follows: the destination builds the VM and answers `Ready`.
    Done = 6,
    /// The source has given the guest up: the destination may run it.
    Go = 7,
    /// Destination to source: the guest runs here (realtime ns when it was resumed).
    Ack = 0x80,
    /// Destination to source: the migration failed here (UTF-8 reason).
    Refuse = 0x81,
    /// Destination to source: the VM is built and not running; it runs on `Go`.
    Ready = 0x82,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        [
            Kind::Hello,
            Kind::Pages,
            Kind::Zeros,
            Kind::RoundEnd,
            Kind::State,
            Kind::Done,
            Kind::Go,
            Kind::Ack,
            Kind::Refuse,
            Kind::Ready,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// The first chunk: who speaks, how much RAM follows, and the machine the destination
/// builds before the pages arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub ram_bytes: u64,
    /// vCPUs (1..=255; the destination checks its KVM allows as many).
    pub vcpus: u32,
    /// KVM's in-kernel irqchip (every SMP guest has it).
    pub irqchip: bool,
    /// A virtio-balloon (its state comes with the vCPUs').
    pub balloon: bool,
    /// A virtio-blk (the destination must have the same disk).
    pub blk: bool,
}

const FLAG_IRQCHIP: u32 = 1;
const FLAG_BALLOON: u32 = 2;
const FLAG_BLK: u32 = 4;

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32);
        p.extend(MAGIC);
        p.extend(VERSION.to_le_bytes());
        p.extend(u32::try_from(PAGE_SIZE).unwrap_or(u32::MAX).to_le_bytes());
        p.extend(self.ram_bytes.to_le_bytes());
        p.extend(self.vcpus.to_le_bytes());
        let flags = if self.irqchip { FLAG_IRQCHIP } else { 0 }
            | if self.balloon { FLAG_BALLOON } else { 0 }
            | if self.blk { FLAG_BLK } else { 0 };
        p.extend(flags.to_le_bytes());
        p
    }

    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let malformed = |detail: String| WireError::Malformed {
            kind: Kind::Hello,
            detail,
        };
        if p.len() != 32 {
            return Err(malformed(format!("{} bytes, not 32", p.len())));
        }
        let magic: [u8; 8] = p[..8].try_into().unwrap_or_default();
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let found = le_u32(&p[8..12]);
        if found != VERSION {
            return Err(WireError::Version { found });
        }
        let page = le_u32(&p[12..16]);
        if u64::from(page) != PAGE_SIZE {
            return Err(malformed(format!("page size {page}, not {PAGE_SIZE}")));
        }
        let ram_bytes = le_u64(&p[16..24]);
        if ram_bytes == 0 || !ram_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(malformed(format!("RAM of {ram_bytes} bytes")));
        }
        let vcpus = le_u32(&p[24..28]);
        let flags = le_u32(&p[28..32]);
        if vcpus == 0 || vcpus > 255 || flags & !(FLAG_IRQCHIP | FLAG_BALLOON | FLAG_BLK) != 0 {
            return Err(malformed(format!("{vcpus} vCPUs, flags {flags:#x}")));
        }
        let irqchip = flags & FLAG_IRQCHIP != 0;
        if vcpus > 1 && !irqchip {
            return Err(malformed(format!("{vcpus} vCPUs without the irqchip")));
        }
        Ok(Hello {
            ram_bytes,
            vcpus,
            irqchip,
            balloon: flags & FLAG_BALLOON != 0,
            blk: flags & FLAG_BLK != 0,
        })
    }
}

/// A run of pages as it travels: where it starts, how many, and (for `Pages`) the bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Run<'a> {
    pub first_pfn: u64,
    pub count: u32,
    /// `count * PAGE_SIZE` bytes for a `Pages` chunk, empty for `Zeros`.
    pub data: &'a [u8],
}

pub fn run_header(first_pfn: u64, count: u32) -> [u8; RUN_HEADER] {
    let mut h = [0u8; RUN_HEADER];
    h[..8].copy_from_slice(&first_pfn.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h
}

impl<'a> Run<'a> {
    /// Decodes a `Pages` or `Zeros` payload and checks it against a RAM of `ram_pages`.
    pub fn decode(kind: Kind, p: &'a [u8], ram_pages: u64) -> Result<Self, WireError> {
        let malformed = |detail: String| WireError::Malformed { kind, detail };
        if p.len() < RUN_HEADER {
            return Err(malformed(format!(
                "{} bytes, under the run header",
                p.len()
            )));
        }
        let first_pfn = le_u64(&p[..8]);
        let count = le_u32(&p[8..12]);
        if count == 0 || count > MAX_RUN_PAGES {
            return Err(malformed(format!("{count} pages in one run")));
        }
        let end = first_pfn.checked_add(u64::from(count));
        if end.is_none_or(|end| end > ram_pages) {
            return Err(malformed(format!(
                "pages {first_pfn}+{count} outside the guest's {ram_pages}"
            )));
        }
        let data = &p[RUN_HEADER..];
        let want = if kind == Kind::Pages {
            u64::from(count) * PAGE_SIZE
        } else {
            0
        };
        if data.len() as u64 != want {
            return Err(malformed(format!("{} data bytes, not {want}", data.len())));
        }
        Ok(Run {
            first_pfn,
            count,
            data,
        })
    }
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(
        b.get(..4)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_default(),
    )
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(
        b.get(..8)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_default(),
    )
}

fn frame(kind: Kind, len: usize) -> [u8; FRAME] {
    let mut h = [0u8; FRAME];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h
}

/// Writes one chunk whose payload is the concatenation of `parts` (no copy into one
/// buffer: a page run's header and its megabyte of data are written as they are).
pub fn write_chunk(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<usize> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("chunk of {len} bytes over {MAX_PAYLOAD}"),
        ));
    }
    let mut header = frame(kind, len);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..8]);
    for p in parts {
        crc.update(p);
    }
    header[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    w.write_all(&header)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(FRAME + len)
}

/// Fills `buf` from `r`; how many bytes came before the end of the stream.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one chunk into `buf` (reused between calls, never grown past [`MAX_PAYLOAD`]);
/// returns its kind with the payload checked against its CRC.
pub fn read_chunk(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, WireError> {
    let mut header = [0u8; FRAME];
    match read_full(r, &mut header)? {
        0 => return Err(WireError::Ended),
        n if n < FRAME => return Err(WireError::Truncated(n)),
        _ => {}
    }
    let kind = Kind::from_byte(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
    let len = usize::try_from(le_u32(&header[4..8])).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong {
            len,
            max: MAX_PAYLOAD,
        });
    }
    buf.clear();
    buf.resize(len, 0);
    let got = read_full(r, buf)?;
    if got < len {
        return Err(WireError::Truncated(FRAME + got));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..8]);
    crc.update(buf);
    let computed = crc.finalize();
    let stored = le_u32(&header[8..12]);
    if computed != stored {
        return Err(WireError::Checksum {
            kind,
            stored,
            computed,
        });
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(ram_bytes: u64) -> Hello {
        Hello {
            ram_bytes,
            vcpus: 1,
            irqchip: false,
            balloon: false,
            blk: false,
        }
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        write_chunk(&mut s, Kind::Hello, &[&hello(1 << 20).encode()]).unwrap();
        let page = vec![0xa5u8; PAGE_BYTES];
        write_chunk(&mut s, Kind::Pages, &[&run_header(3, 1), &page]).unwrap();
        write_chunk(&mut s, Kind::Done, &[]).unwrap();
        s
    }

    #[test]
    fn chunks_round_trip() {
        let s = stream();
        let mut r = &s[..];
        let mut buf = Vec::new();
        assert_eq!(read_chunk(&mut r, &mut buf).unwrap(), Kind::Hello);
        assert_eq!(Hello::decode(&buf).unwrap().ram_bytes, 1 << 20);
        assert_eq!(read_chunk(&mut r, &mut buf).unwrap(), Kind::Pages);
        let run = Run::decode(Kind::Pages, &buf, 256).unwrap();
        assert_eq!((run.first_pfn, run.count), (3, 1));
        assert!(run.data.iter().all(|b| *b == 0xa5));
        assert_eq!(read_chunk(&mut r, &mut buf).unwrap(), Kind::Done);
        assert!(matches!(
            read_chunk(&mut r, &mut buf),
            Err(WireError::Ended)
        ));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let s = stream();
        // Each bit of the page chunk's frame and a sample of its payload.
        let start = 12 + 32;
        for bit in (0..(12 + 16 + 64) * 8).chain([(12 + 16 + 4000) * 8 + 3]) {
            let mut bad = s.clone();
            bad[start + bit / 8] ^= 1 << (bit % 8);
            let mut r = &bad[start..];
            let mut buf = Vec::new();
            let result = read_chunk(&mut r, &mut buf);
            assert!(result.is_err(), "bit {bit} flipped was accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let s = stream();
        let mut buf = Vec::new();
        for cut in 1..(12 + 32) {
            let mut r = &s[..cut];
            assert!(
                matches!(read_chunk(&mut r, &mut buf), Err(WireError::Truncated(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bounds_are_checked_before_use() {
        let mut buf = Vec::new();
        let mut huge = frame(Kind::Pages, 0).to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_chunk(&mut &huge[..], &mut buf),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            read_chunk(&mut &[0x42u8; 12][..], &mut buf),
            Err(WireError::UnknownKind(0x42))
        ));
        let outside = run_header(255, 2);
        Run::decode(Kind::Zeros, &outside, 256).unwrap_err();
        let wrap = run_header(u64::MAX, 1);
        Run::decode(Kind::Zeros, &wrap, 256).unwrap_err();
        Run::decode(Kind::Zeros, &run_header(0, 0), 256).unwrap_err();
        Run::decode(Kind::Pages, &run_header(0, 1), 256).unwrap_err();
        let mut smp = hello(4096);
        smp.vcpus = 2;
        Hello::decode(&smp.encode()).unwrap_err();
        smp.irqchip = true;
        assert_eq!(Hello::decode(&smp.encode()).unwrap(), smp);
        let mut flags = smp.encode();
        flags[31] = 0x80;
        Hello::decode(&flags).unwrap_err();
        let mut old = hello(4096).encode();
        old[8] = 9;
        assert!(matches!(
            Hello::decode(&old),
            Err(WireError::Version { found: 9 })
        ));
        assert!(matches!(Hello::decode(&[0; 32]), Err(WireError::Magic(_))));
    }
}
