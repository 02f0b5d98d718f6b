//! A minimal xenstore client over the shared ring (`struct xenstore_domain_interface` and
//! `struct xsd_sockmsg`, xen/include/public/io/xs_wire.h): one request at a time, reads, writes
//! and watches, no transactions. Runs in user mode; only the event-channel kick needs the
//! kernel. The guest has no interrupts, so replies and watch events are polled for in the
//! ring itself (memory reads, no hypercall), giving the CPU back to Xen between looks
//! (xenstored runs in dom0 and needs it).
//!
//! Traffic is kept low on purpose: a guest that re-reads a key in a loop makes dom0 take
//! an event per request, and in the TCG-nested lab a storm of them made dom0's processes
//! crash. A watch costs nothing until the key changes.

use core::sync::atomic::{fence, Ordering};

use crate::arch::user::syscall;
use crate::hypervisor::xen;
use crate::sysabi::Syscall;

const RING_SIZE: u32 = 1024;
/// Offsets in the ring page: req[1024], rsp[1024], then req_cons, req_prod, rsp_cons,
/// rsp_prod (u32 each).
const REQ: u64 = 0;
const RSP: u64 = 1024;
const REQ_CONS: u64 = 2048;
const REQ_PROD: u64 = 2052;
const RSP_CONS: u64 = 2056;
const RSP_PROD: u64 = 2060;

const XS_READ: u32 = 2;
const XS_WATCH: u32 = 4;
const XS_UNWATCH: u32 = 5;
const XS_WRITE: u32 = 11;
const XS_WATCH_EVENT: u32 = 15;
const XS_ERROR: u32 = 16;
const HEADER_LEN: u32 = 16;
/// The longest payload of a message either way (XENSTORE_PAYLOAD_MAX).
const PAYLOAD_MAX: u32 = 4096;
/// Longest reply kept (a value hvbench reads is a decimal number).
pub const MAX_REPLY: usize = 128;
/// How many times the client gives the CPU away while waiting before it gives up: about
/// seconds on a real host, minutes under TCG.
const MAX_WAITS: u32 = 2_000_000;

pub struct Xenstore {
    ring: u64,
    port: u32,
    next_id: u32,
    /// A watch event arrived (while a reply was awaited) and was not yet reported.
    fired: bool,
}

/// A message's header fields: type, request id, payload length.
struct Header {
    kind: u32,
    id: u32,
    len: usize,
}

fn index(ring: u64, offset: u64) -> *mut u32 {
    (ring + offset) as *mut u32
}

fn load(ring: u64, offset: u64) -> u32 {
    // SAFETY: `ring` is the xenstore page Xen named, identity-mapped by the boot page
    // tables; the indexes are whole, aligned u32s, read as the other end writes them.
    let v = unsafe { index(ring, offset).read_volatile() };
    fence(Ordering::Acquire);
    v
}

fn store(ring: u64, offset: u64, value: u32) {
    // The other end must see the bytes before the index that publishes them.
    fence(Ordering::Release);
    // SAFETY: as in `load`.
    unsafe { index(ring, offset).write_volatile(value) }
}

fn wait() {
    syscall(Syscall::Yield as u64, 0, 0, 0);
}

impl Xenstore {
    /// The domain's xenstore connection, if Xen gave it one.
    pub fn open() -> Option<Self> {
        let (ring, port) = xen::store()?;
        Some(Xenstore {
            ring,
            port,
            next_id: 1,
            fired: false,
        })
    }

    fn kick(&self) {
        syscall(Syscall::XenEventSend as u64, self.port as u64, 0, 0);
    }

    fn write_request(&mut self, bytes: &[&[u8]]) -> Result<(), &'static str> {
        let total: usize = bytes.iter().map(|b| b.len()).sum();
        let mut waits = 0;
        loop {
            let cons = load(self.ring, REQ_CONS);
            let prod = load(self.ring, REQ_PROD);
            let used = prod.wrapping_sub(cons);
            if used > RING_SIZE {
                return Err("xenstore request ring indexes are corrupt");
            }
            if (RING_SIZE - used) as usize >= total {
                let mut at = prod;
                for part in bytes {
                    for &b in *part {
                        let slot = (at % RING_SIZE) as u64;
                        // SAFETY: `slot` < 1024: inside the ring's req[] array.
                        unsafe { ((self.ring + REQ + slot) as *mut u8).write_volatile(b) };
                        at = at.wrapping_add(1);
                    }
                }
                store(self.ring, REQ_PROD, at);
                self.kick();
                return Ok(());
            }
            waits += 1;
            if waits > MAX_WAITS {
                return Err("xenstore did not take the request");
            }
            self.kick();
            wait();
        }
    }

    /// Copies `out.len()` bytes of the reply stream, waiting for them.
    fn read_reply(&mut self, out: &mut [u8]) -> Result<(), &'static str> {
        let mut done = 0;
        let mut waits = 0;
        while done < out.len() {
            let cons = load(self.ring, RSP_CONS);
            let prod = load(self.ring, RSP_PROD);
            let avail = prod.wrapping_sub(cons);
            if avail > RING_SIZE {
                return Err("xenstore reply ring indexes are corrupt");
            }
            if avail == 0 {
                waits += 1;
                if waits > MAX_WAITS {
                    return Err("xenstore did not answer");
                }
                wait();
                continue;
            }
            let n = avail.min(u32::try_from(out.len() - done).unwrap_or(u32::MAX));
            for (i, slot) in (0..n).zip(&mut out[done..]) {
                let at = u64::from(cons.wrapping_add(i) % RING_SIZE);
                // SAFETY: `at` < 1024: inside the ring's rsp[] array.
                *slot = unsafe { ((self.ring + RSP + at) as *const u8).read_volatile() };
            }
            store(self.ring, RSP_CONS, cons.wrapping_add(n));
            // xenstored only waits for room when the ring was full: kick only then.
            if avail == RING_SIZE {
                self.kick();
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Discards `len` bytes of the reply stream.
    fn skip_reply(&mut self, mut len: usize) -> Result<(), &'static str> {
        let mut scratch = [0u8; 64];
        while len > 0 {
            let n = len.min(scratch.len());
            self.read_reply(&mut scratch[..n])?;
            len -= n;
        }
        Ok(())
    }

    fn request(&mut self, kind: u32, parts: &[&[u8]]) -> Result<u32, &'static str> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len)
            .ok()
            .filter(|len| *len <= PAYLOAD_MAX)
            .ok_or("xenstore request longer than its protocol allows")?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[4..8].copy_from_slice(&id.to_le_bytes());
        header[12..16].copy_from_slice(&len.to_le_bytes());
        let mut all: [&[u8]; 5] = [&header, &[], &[], &[], &[]];
        for (slot, part) in all[1..].iter_mut().zip(parts) {
            *slot = part;
        }
        self.write_request(&all)?;
        Ok(id)
    }

    /// Reads one whole message; its payload goes to `out` (or is discarded if longer).
    fn message(&mut self, out: &mut [u8; MAX_REPLY]) -> Result<Header, &'static str> {
        let mut raw = [0u8; HEADER_LEN as usize];
        self.read_reply(&mut raw)?;
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let header = Header {
            kind: word(0),
            id: word(4),
            len: word(12) as usize,
        };
        if header.len > PAYLOAD_MAX as usize {
            return Err("xenstore sent a message longer than its protocol allows");
        }
        if header.len > MAX_REPLY {
            self.skip_reply(header.len)?;
        } else {
            self.read_reply(&mut out[..header.len])?;
        }
        Ok(header)
    }

    /// Waits for the reply to request `id`; watch events met on the way are remembered.
    fn reply(
        &mut self,
        id: u32,
        kind: u32,
        out: &mut [u8; MAX_REPLY],
    ) -> Result<usize, &'static str> {
        loop {
            let header = self.message(out)?;
            if header.kind == XS_WATCH_EVENT {
                self.fired = true;
                continue;
            }
            if header.id != id {
                continue;
            }
            if header.kind == XS_ERROR {
                return Err("xenstore answered with an error");
            }
            if header.kind != kind || header.len > MAX_REPLY {
                return Err("xenstore answered with an unexpected reply");
            }
            return Ok(header.len);
        }
    }

    /// Reads the value at `path` (relative paths are under /local/domain/<own id>) into
    /// `out`; returns its length.
    pub fn read(&mut self, path: &str, out: &mut [u8; MAX_REPLY]) -> Result<usize, &'static str> {
        let id = self.request(XS_READ, &[path.as_bytes(), &[0]])?;
        self.reply(id, XS_READ, out)
    }

    /// Watches `path`: xenstored sends an event when it changes (and one at once).
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), &'static str> {
        let id = self.request(XS_WATCH, &[path.as_bytes(), &[0], token.as_bytes(), &[0]])?;
        let mut out = [0u8; MAX_REPLY];
        self.reply(id, XS_WATCH, &mut out).map(|_| ())
    }

    /// Stops watching `path` (registered with `token`).
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), &'static str> {
        let id = self.request(XS_UNWATCH, &[path.as_bytes(), &[0], token.as_bytes(), &[0]])?;
        let mut out = [0u8; MAX_REPLY];
        self.reply(id, XS_UNWATCH, &mut out).map(|_| ())
    }

    /// Writes `value` at `path` (relative paths are under /local/domain/<own id>).
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), &'static str> {
        let id = self.request(XS_WRITE, &[path.as_bytes(), &[0], value])?;
        let mut out = [0u8; MAX_REPLY];
        self.reply(id, XS_WRITE, &mut out).map(|_| ())
    }

    /// Whether a watch event has arrived since the last call, without waiting.
    pub fn watch_fired(&mut self) -> Result<bool, &'static str> {
        if core::mem::take(&mut self.fired) {
            return Ok(true);
        }
        let mut fired = false;
        while load(self.ring, RSP_PROD) != load(self.ring, RSP_CONS) {
            let mut out = [0u8; MAX_REPLY];
            // Only watch events arrive unasked; a stray reply is dropped.
            fired |= self.message(&mut out)?.kind == XS_WATCH_EVENT;
        }
        Ok(fired)
    }

    /// Reads a decimal number at `path`.
    pub fn read_number(&mut self, path: &str) -> Result<u64, &'static str> {
        let mut buf = [0u8; MAX_REPLY];
        let len = self.read(path, &mut buf)?;
        let text = core::str::from_utf8(&buf[..len]).map_err(|_| "xenstore value is not text")?;
        text.trim_end_matches('\0')
            .trim()
            .parse()
            .map_err(|_| "xenstore value is not a decimal number")
    }
}
