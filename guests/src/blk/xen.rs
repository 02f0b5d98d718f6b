//! blkfront: the guest's half of Xen's paravirtual block device, behind the same request
//! interface as the virtio-blk driver. It runs in user mode and polls.
//!
//! Layouts and numbers from Xen's public headers (xen/include/public): io/blkif.h
//! (`blkif_request`, `blkif_response`, the operations, the frontend and backend keys),
//! io/ring.h (the shared ring: four indexes in a 64-byte header, then entries; the number
//! of entries is a power of two), grant_table.h (`grant_entry_v1`, GTF_* flags, the first
//! 8 references reserved for the toolstack), io/xenbus.h (XenbusState*), memory.h
//! (XENMEM_add_to_physmap, XENMAPSPACE_grant_table), event_channel.h.
//!
//! Set-up (once per boot; later workloads reuse the connection): read the backend's path
//! and domain from `device/vbd/51712` (xvda, as the host's xl config names the disk), wait
//! for the backend to reach InitWait, map grant-table frame 0 over a page of our own
//! (XENMEM_add_to_physmap: a PVH guest has no grant frames until it asks), grant the
//! backend the ring page, allocate an unbound event channel for it, write `ring-ref`,
//! `event-channel`, `protocol` and state Initialised, wait for the backend's Connected,
//! read `sectors` and `feature-flush-cache`, write state Connected.
//!
//! Requests: one page-sized ring of 32 entries of 112 bytes; a request carries at most 11
//! segments (11 pages, 44 KiB). A larger request of the interface (up to 1 MiB) is sent
//! as several ring requests, as many at a time as the 32 ring ids allow; its completion is
//! reported when the last one is answered. Ring id i owns grant references 8 + 11 i ...
//! (352 in all) and the ring page the next one, so one grant frame (512 entries) holds
//! them. The backend is notified when it asked to be (the ring's `req_event`); the guest
//! takes no interrupts and finds responses by polling `rsp_prod`.

use core::ptr::{read_volatile, write_bytes, write_volatile};
use core::sync::atomic::{fence, Ordering};

use workloads::virtio_blk::{MAX_REQUEST_BYTES, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};

use super::{BlkError, BlockDevice, Completion, Op, MAX_SLOTS};
use crate::arch::user::syscall;
use crate::convert::{low32, usize_from};
use crate::global::Global;
use crate::hypervisor::xen::XENMEM_ADD_TO_PHYSMAP;
use crate::hypervisor::xen::{AddToPhysmap, DOMID_SELF, XENMAPSPACE_GRANT_TABLE};
use crate::hypervisor::xenstore::{Xenstore, MAX_REPLY};
use crate::mem::arena::{alloc_fresh, PAGE};
use crate::sysabi::Syscall;

/// The frontend's directory: xvda (major 202, minor 0: 202 << 8).
const FRONTEND: &str = "device/vbd/51712";
/// Its number, the requests' `handle`.
const VDEV: u16 = 51712;
/// Entries of the one-page ring: (4096 - 64) / 112 rounded down to a power of two.
const RING_SIZE: u32 = 32;
const RING_HEADER: u64 = 64;
const REQUEST_BYTES: u64 = 112;
/// Segments of one ring request (BLKIF_MAX_SEGMENTS_PER_REQUEST).
const MAX_SEGMENTS: u8 = 11;
/// Ring ids (at most one ring request each in flight).
const IDS: usize = 32;
const _: () = assert!(IDS as u64 == RING_SIZE as u64);
/// The first grant reference not reserved for the toolstack.
const FIRST_REF: u32 = 8;
/// The ring page's grant reference, after every id's.
const RING_REF: u32 = FIRST_REF + RING_SIZE * MAX_SEGMENTS as u32;
const GTF_PERMIT_ACCESS: u16 = 1;
const GTF_READONLY: u16 = 1 << 2;
const BLKIF_OP_READ: u8 = 0;
const BLKIF_OP_WRITE: u8 = 1;
const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
const STATE_INIT_WAIT: u64 = 2;
const STATE_CONNECTED: u64 = 4;
const STATE_CLOSING: u64 = 5;
/// Watch events (or quiet spells) to wait through for a backend state: minutes under TCG.
const MAX_LOOKS: u32 = 400;
/// Yields between looks at the ring for a watch event.
const YIELDS_PER_LOOK: u32 = 20_000;
/// Polls of the ring for earlier requests' answers before a reused device gives up.
const MAX_DRAIN_POLLS: u64 = 1 << 33;
const WATCH_TOKEN: &str = "hvbench-blkfront";
/// `id_tag` entry of a free ring id.
const FREE: u16 = u16::MAX;

/// One tag's request: what is still to send, and what is in flight.
#[derive(Clone, Copy)]
struct Pending {
    busy: bool,
    op: u8,
    /// Disk byte offset and buffer address of the part not yet sent.
    offset: u64,
    buf: u64,
    left: u64,
    /// Ring requests sent and not yet answered.
    outstanding: u8,
    /// The worst status among its answers (virtio-blk's codes).
    status: u8,
}

const IDLE: Pending = Pending {
    busy: false,
    op: 0,
    offset: 0,
    buf: 0,
    left: 0,
    outstanding: 0,
    status: S_OK,
};

#[derive(Clone, Copy)]
struct State {
    ring: u64,
    grants: u64,
    port: u32,
    backend: u16,
    capacity: u64,
    flush: bool,
    req_prod_pvt: u32,
    rsp_cons: u32,
    /// Which tag each ring id serves.
    id_tag: [u16; IDS],
    tags: [Pending; MAX_SLOTS as usize],
    /// Where the next push starts looking, so that tags take turns.
    next_tag: u16,
    /// Requests pushed since the last notification check.
    pushed_from: u32,
}

/// The connection, kept between workloads (the backend is connected once per boot).
static SAVED: Global<Option<State>> = Global::new(None);

/// The device; hands its state back for the next workload when dropped.
pub struct XenBlk {
    s: State,
}

impl Drop for XenBlk {
    fn drop(&mut self) {
        SAVED.set(Some(self.s));
    }
}

/// A ring id as an index of `id_tag`.
fn index(id: u32) -> usize {
    usize_from(u64::from(id))
}

/// The 512-byte sector of its page that byte address `at` falls in (0..8).
fn sector_in_page(at: u64) -> u8 {
    // (at % 4096) / 512 < 8: the first of the bytes always holds it.
    ((at % PAGE) / SECTOR_SIZE).to_le_bytes()[0]
}

/// A path built in a fixed buffer (xenstore paths hvbench uses are short).
struct PathBuf {
    bytes: [u8; MAX_REPLY + 32],
    len: usize,
}

impl PathBuf {
    fn new(parts: &[&[u8]]) -> Result<Self, &'static str> {
        let mut p = PathBuf {
            bytes: [0; MAX_REPLY + 32],
            len: 0,
        };
        for part in parts {
            let end = p.len + part.len();
            p.bytes
                .get_mut(p.len..end)
                .ok_or("a xenstore path is too long")?
                .copy_from_slice(part);
            p.len = end;
        }
        Ok(p)
    }

    fn as_str(&self) -> Result<&str, &'static str> {
        core::str::from_utf8(&self.bytes[..self.len]).map_err(|_| "a xenstore path is not text")
    }
}

fn key(dir: &str, name: &str) -> Result<PathBuf, &'static str> {
    PathBuf::new(&[dir.as_bytes(), b"/", name.as_bytes()])
}

/// Decimal digits of `n`.
fn decimal(n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut at = out.len();
    let mut n = n;
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[at..];
        }
    }
}

fn write_number(xs: &mut Xenstore, path: &str, n: u64) -> Result<(), &'static str> {
    let mut digits = [0u8; 20];
    xs.write(path, decimal(n, &mut digits))
}

/// Waits until the backend's state satisfies `done`; fails if it closes.
fn wait_state(xs: &mut Xenstore, path: &str, done: fn(u64) -> bool) -> Result<(), &'static str> {
    xs.watch(path, WATCH_TOKEN)?;
    let result = (|| {
        for _ in 0..MAX_LOOKS {
            // The key may not exist yet (the backend is still being set up).
            let state = xs.read_number(path).unwrap_or(0);
            if done(state) {
                return Ok(());
            }
            if state >= STATE_CLOSING {
                return Err("the Xen block backend closed the device before it connected");
            }
            for _ in 0..YIELDS_PER_LOOK {
                if xs.watch_fired()? {
                    break;
                }
                syscall(Syscall::Yield as u64, 0, 0, 0);
            }
        }
        Err("the Xen block backend did not reach the state blkfront waits for")
    })();
    let _ = xs.unwatch(path, WATCH_TOKEN);
    result
}

/// Maps grant-table frame 0 over the page at `page` (its RAM goes back to Xen).
fn map_grant_frame(page: u64) -> Result<(), &'static str> {
    let arg = AddToPhysmap {
        domid: DOMID_SELF,
        size: 0,
        space: XENMAPSPACE_GRANT_TABLE,
        idx: 0,
        gpfn: page / PAGE,
    };
    let rc = syscall(
        Syscall::XenMemoryOp as u64,
        XENMEM_ADD_TO_PHYSMAP,
        &arg as *const AddToPhysmap as u64,
        0,
    );
    if rc != 0 {
        return Err("Xen refused to map the grant table (XENMEM_add_to_physmap)");
    }
    Ok(())
}

impl State {
    /// Grants domain `backend` access to the frame at `addr` through reference `gref`.
    fn grant(&self, gref: u32, addr: u64, readonly: bool) {
        let entry = self.grants + 8 * gref as u64;
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        // SAFETY: entry `gref` (< 512) of the grant-table frame mapped at `grants`;
        // domid and frame are written before the flags that make them valid.
        unsafe {
            write_volatile((entry + 2) as *mut u16, self.backend);
            // `queue` refused buffers whose frame numbers do not fit 32 bits.
            write_volatile((entry + 4) as *mut u32, low32(addr / PAGE));
            fence(Ordering::Release);
            write_volatile(entry as *mut u16, flags);
        }
    }

    fn ring_u32(&self, offset: u64) -> u32 {
        // SAFETY: an index of the shared ring's header, in the ring page this driver owns.
        unsafe { read_volatile((self.ring + offset) as *const u32) }
    }

    fn set_ring_u32(&self, offset: u64, value: u32) {
        // SAFETY: as in `ring_u32`.
        unsafe { write_volatile((self.ring + offset) as *mut u32, value) }
    }
}

impl XenBlk {
    /// The device: connected now, or the connection an earlier workload made.
    pub fn open() -> Result<Self, &'static str> {
        if let Some(s) = SAVED.get() {
            SAVED.set(None);
            let mut dev = XenBlk { s };
            dev.drain()?;
            return Ok(dev);
        }
        Self::connect()
    }

    /// Waits for the answers to requests an earlier workload left in flight.
    fn drain(&mut self) -> Result<(), &'static str> {
        let mut polls = 0u64;
        while self.s.id_tag.iter().any(|t| *t != FREE) {
            if self.poll().is_none() {
                polls += 1;
                if polls > MAX_DRAIN_POLLS {
                    return Err("the Xen block backend did not answer earlier requests");
                }
                core::hint::spin_loop();
            }
        }
        self.s.tags = [IDLE; MAX_SLOTS as usize];
        Ok(())
    }

    fn connect() -> Result<Self, &'static str> {
        let mut xs = Xenstore::open().ok_or("Xen gave this domain no xenstore")?;
        let mut raw = [0u8; MAX_REPLY];
        let len = xs
            .read(key(FRONTEND, "backend")?.as_str()?, &mut raw)
            .map_err(|_| {
                "no Xen block device (xvda): the host gives one when the run has a disk"
            })?;
        let backend_dir = PathBuf::new(&[raw[..len].strip_suffix(&[0]).unwrap_or(&raw[..len])])?;
        let backend_dir = backend_dir.as_str()?;
        let backend = u16::try_from(xs.read_number(key(FRONTEND, "backend-id")?.as_str()?)?)
            .map_err(|_| "the block backend's domain id is not a domain id")?;
        let backend_state = key(backend_dir, "state")?;
        wait_state(&mut xs, backend_state.as_str()?, |s| s >= STATE_INIT_WAIT)?;
        let ring = alloc_fresh(PAGE, PAGE).ok_or("no memory for the blkif ring")?;
        let grants = alloc_fresh(PAGE, PAGE).ok_or("no memory for the grant table")?;
        map_grant_frame(grants)?;
        let port = syscall(Syscall::XenAllocUnbound as u64, backend as u64, 0, 0);
        let port = u32::try_from(port).map_err(|_| "Xen refused an event channel for blkfront")?;
        let mut s = State {
            ring,
            grants,
            port,
            backend,
            capacity: 0,
            flush: false,
            req_prod_pvt: 0,
            rsp_cons: 0,
            id_tag: [FREE; IDS],
            tags: [IDLE; MAX_SLOTS as usize],
            next_tag: 0,
            pushed_from: 0,
        };
        // SAFETY: the ring page allocated above, never handed out again.
        unsafe { write_bytes(ring as *mut u8, 0, usize_from(PAGE)) };
        // SHARED_RING_INIT: both event indexes at 1.
        s.set_ring_u32(4, 1);
        s.set_ring_u32(12, 1);
        s.grant(RING_REF, ring, false);
        let front = |name| key(FRONTEND, name);
        write_number(&mut xs, front("ring-ref")?.as_str()?, RING_REF as u64)?;
        write_number(&mut xs, front("event-channel")?.as_str()?, port as u64)?;
        xs.write(front("protocol")?.as_str()?, b"x86_64-abi")?;
        write_number(&mut xs, front("state")?.as_str()?, 3)?;
        wait_state(&mut xs, backend_state.as_str()?, |s| s == STATE_CONNECTED)?;
        let sectors = xs.read_number(key(backend_dir, "sectors")?.as_str()?)?;
        s.capacity = sectors.saturating_mul(SECTOR_SIZE);
        s.flush = xs
            .read_number(key(backend_dir, "feature-flush-cache")?.as_str()?)
            .is_ok_and(|f| f == 1);
        write_number(&mut xs, front("state")?.as_str()?, STATE_CONNECTED)?;
        Ok(XenBlk { s })
    }

    fn free_id(&self) -> Option<u32> {
        (0..RING_SIZE).find(|id| self.s.id_tag[index(*id)] == FREE)
    }

    /// Sends as much of the tags' requests as the free ring ids allow.
    fn push(&mut self) {
        let slots = MAX_SLOTS;
        for step in 0..slots {
            let tag = (self.s.next_tag + step) % slots;
            while self.s.tags[tag as usize].busy && self.s.tags[tag as usize].left > 0 {
                let Some(id) = self.free_id() else {
                    self.s.next_tag = tag;
                    return;
                };
                self.send(tag, id);
            }
        }
    }

    /// One ring request of up to 11 pages of tag `tag`'s request, as ring id `id`.
    fn send(&mut self, tag: u16, id: u32) {
        let p = self.s.tags[tag as usize];
        let slot = self.s.req_prod_pvt % RING_SIZE;
        let req = self.s.ring + RING_HEADER + REQUEST_BYTES * u64::from(slot);
        let mut segments = 0u8;
        let mut sent = 0u64;
        while segments < MAX_SEGMENTS && sent < p.left {
            let at = p.buf + sent;
            let in_page = (PAGE - at % PAGE).min(p.left - sent);
            let gref = FIRST_REF + id * u32::from(MAX_SEGMENTS) + u32::from(segments);
            // The device writes into the buffer for a read, reads it for a write.
            self.s.grant(gref, at, p.op == BLKIF_OP_WRITE);
            let first = sector_in_page(at);
            let last = sector_in_page(at + in_page - 1);
            let seg = req + 24 + 8 * u64::from(segments);
            // SAFETY: segment `segments` (< 11) of ring entry `slot`, in the ring page.
            unsafe {
                write_volatile(seg as *mut u32, gref);
                write_volatile((seg + 4) as *mut u8, first);
                write_volatile((seg + 5) as *mut u8, last);
            }
            segments += 1;
            sent += in_page;
        }
        // SAFETY: the header fields of ring entry `slot`, in the ring page.
        unsafe {
            write_volatile(req as *mut u8, p.op);
            write_volatile((req + 1) as *mut u8, segments);
            write_volatile((req + 2) as *mut u16, VDEV);
            write_volatile((req + 8) as *mut u64, u64::from(id));
            write_volatile((req + 16) as *mut u64, p.offset / SECTOR_SIZE);
        }
        let t = &mut self.s.tags[tag as usize];
        t.offset += sent;
        t.buf += sent;
        t.left -= sent;
        t.outstanding += 1;
        self.s.id_tag[index(id)] = tag;
        self.s.req_prod_pvt = self.s.req_prod_pvt.wrapping_add(1);
    }

    /// Publishes the pushed requests and notifies the backend if it asked to be.
    fn publish(&mut self) {
        let old = self.s.pushed_from;
        let new = self.s.req_prod_pvt;
        if old == new {
            return;
        }
        fence(Ordering::Release);
        self.s.set_ring_u32(0, new);
        fence(Ordering::SeqCst);
        self.s.pushed_from = new;
        // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
        let event = self.s.ring_u32(4);
        if new.wrapping_sub(event) < new.wrapping_sub(old) {
            syscall(Syscall::XenEventSend as u64, self.s.port as u64, 0, 0);
        }
    }

    /// Takes one response off the ring; the tag it finished, if it finished one.
    fn take_response(&mut self) -> Option<Option<Completion>> {
        if self.s.rsp_cons == self.s.ring_u32(8) {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = self.s.rsp_cons % RING_SIZE;
        let rsp = self.s.ring + RING_HEADER + REQUEST_BYTES * u64::from(slot);
        // SAFETY: the id and status of ring entry `slot`, in the ring page.
        let (id, status) = unsafe {
            (
                read_volatile(rsp as *const u64),
                read_volatile((rsp + 10) as *const i16),
            )
        };
        self.s.rsp_cons = self.s.rsp_cons.wrapping_add(1);
        // An id the driver did not send (a misbehaving backend) is reported with a tag
        // past the slots, as the virtio driver does.
        let stray = Some(Completion {
            tag: u16::MAX,
            status: S_IOERR,
        });
        let Some(i) = usize::try_from(id).ok().filter(|i| *i < IDS) else {
            return Some(stray);
        };
        let tag = self.s.id_tag[i];
        if tag == FREE {
            return Some(stray);
        }
        self.s.id_tag[i] = FREE;
        let t = &mut self.s.tags[tag as usize];
        t.outstanding = t.outstanding.saturating_sub(1);
        t.status = match status {
            0 => t.status,
            BLKIF_RSP_EOPNOTSUPP => S_UNSUPP,
            _ => S_IOERR,
        };
        if t.left == 0 && t.outstanding == 0 {
            let done = Completion {
                tag,
                status: t.status,
            };
            *t = IDLE;
            return Some(Some(done));
        }
        Some(None)
    }
}

impl BlockDevice for XenBlk {
    fn capacity(&self) -> u64 {
        self.s.capacity
    }

    fn slots(&self) -> u16 {
        MAX_SLOTS
    }

    fn queue(&mut self, tag: u16, op: Op, offset: u64, buf: u64, len: u32) -> Result<(), BlkError> {
        let busy = self.s.tags.get(tag as usize).is_none_or(|t| t.busy);
        if busy {
            return Err(BlkError::BadTag);
        }
        let op = match op {
            Op::Read => BLKIF_OP_READ,
            Op::Write => BLKIF_OP_WRITE,
            Op::Flush if !self.s.flush => return Err(BlkError::NoFlush),
            Op::Flush => BLKIF_OP_FLUSH_DISKCACHE,
        };
        let len = len as u64;
        if op != BLKIF_OP_FLUSH_DISKCACHE {
            let in_disk = offset
                .checked_add(len)
                .is_some_and(|e| e <= self.s.capacity);
            let sectors = [offset, buf, len]
                .iter()
                .all(|v| v.is_multiple_of(SECTOR_SIZE));
            // Grant entries hold 32-bit frame numbers.
            let frames = buf.checked_add(len).is_some_and(|e| e <= PAGE << 32);
            if !in_disk || !sectors || !frames || len == 0 || len > MAX_REQUEST_BYTES as u64 {
                return Err(BlkError::OutOfRange);
            }
        }
        let flush_id = self.free_id();
        if op == BLKIF_OP_FLUSH_DISKCACHE && flush_id.is_none() {
            return Err(BlkError::BadTag);
        }
        self.s.tags[tag as usize] = Pending {
            busy: true,
            op,
            offset,
            buf,
            left: len,
            outstanding: 0,
            status: S_OK,
        };
        if let (BLKIF_OP_FLUSH_DISKCACHE, Some(id)) = (op, flush_id) {
            // No segments: one ring request.
            self.send_flush(tag, id);
        }
        Ok(())
    }

    fn kick(&mut self) {
        self.push();
        self.publish();
    }

    fn poll(&mut self) -> Option<Completion> {
        loop {
            match self.take_response()? {
                Some(done) => {
                    // Ids came free: send what waits for them.
                    self.kick();
                    return Some(done);
                }
                None => self.kick(),
            }
        }
    }

    fn needs_reset(&self) -> bool {
        false
    }
}

impl XenBlk {
    fn send_flush(&mut self, tag: u16, id: u32) {
        let slot = self.s.req_prod_pvt % RING_SIZE;
        let req = self.s.ring + RING_HEADER + REQUEST_BYTES * u64::from(slot);
        // SAFETY: the header fields of ring entry `slot`, in the ring page.
        unsafe {
            write_volatile(req as *mut u8, BLKIF_OP_FLUSH_DISKCACHE);
            write_volatile((req + 1) as *mut u8, 0);
            write_volatile((req + 2) as *mut u16, VDEV);
            write_volatile((req + 8) as *mut u64, u64::from(id));
            write_volatile((req + 16) as *mut u64, 0);
        }
        self.s.tags[tag as usize].outstanding = 1;
        self.s.id_tag[index(id)] = tag;
        self.s.req_prod_pvt = self.s.req_prod_pvt.wrapping_add(1);
    }
}
