//! A virtio-blk driver on the virtio-mmio transport (version 2): found at hvbench's VMM's
//! address or in one of QEMU microvm's transport slots, one request queue of 256 entries in
//! arena memory, three descriptors per request (header, data, status) in fixed slots per
//! tag, so up to 64 requests are in flight. It runs in user mode (the MMIO pages are
//! user-accessible) and polls the used ring. Notifications go to the queue-notify register
//! (an ioeventfd on hvbench's VMM and on QEMU/KVM).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use workloads::virtio::{
    DESC_F_NEXT, DESC_F_WRITE, FEATURE_VERSION_1_BIT, FEATURE_VERSION_1_WORD, MAGIC, REG_CONFIG,
    REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_MAGIC, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS,
    REG_VERSION, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VERSION,
};
use workloads::virtio_blk::{
    CONFIG_CAPACITY, DEVICE_ID_BLOCK, F_FLUSH, HEADER_LEN, MAX_REQUEST_BYTES, MICROVM_VIRTIO_BASE,
    MICROVM_VIRTIO_SLOTS, MICROVM_VIRTIO_STRIDE, QUEUE_REQUEST, SECTOR_SIZE, T_FLUSH, T_IN, T_OUT,
    VIRTIO_BLK_BASE,
};

use super::{BlkError, BlockDevice, Completion, Op};
use crate::convert::low32;
use crate::mem::arena::{alloc_work, PAGE};
use crate::virtio::Descriptor;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Descriptors per request.
const PER_REQUEST: u16 = 3;
/// Tags: requests in flight at once (three descriptors each, under the queue's size).
pub const SLOTS: u16 = super::MAX_SLOTS;
/// Bytes per tag in the header page: the 16-byte header, then the status byte.
const HEADER_STRIDE: u64 = 32;
/// Status byte value before the device writes one.
pub const STATUS_PENDING: u8 = 0xff;

fn read(base: u64, offset: u64) -> u32 {
    // SAFETY: a register of a virtio-mmio page, identity-mapped uncached.
    unsafe { read_volatile((base + offset) as *const u32) }
}

fn write(base: u64, offset: u64, value: u32) {
    // SAFETY: as in `read`.
    unsafe { write_volatile((base + offset) as *mut u32, value) }
}

fn is_blk(base: u64) -> bool {
    read(base, REG_MAGIC) == MAGIC
        && read(base, REG_VERSION) == VERSION
        && read(base, REG_DEVICE_ID) == DEVICE_ID_BLOCK
}

/// Where a virtio-blk answers: hvbench's VMM's page, else QEMU microvm's slots.
fn probe() -> Option<u64> {
    core::iter::once(VIRTIO_BLK_BASE)
        .chain((0..MICROVM_VIRTIO_SLOTS).map(|i| MICROVM_VIRTIO_BASE + i * MICROVM_VIRTIO_STRIDE))
        .find(|base| is_blk(*base))
}

/// The device, set up (DRIVER_OK).
pub struct VirtioBlk {
    base: u64,
    desc: u64,
    avail: u64,
    used: u64,
    /// One page: tag t's header at t * 32, its status byte 16 bytes later.
    headers: u64,
    next_avail: u16,
    next_used: u16,
    capacity: u64,
    flush: bool,
    in_flight: u64,
}

impl VirtioBlk {
    /// Finds the device and sets it up (virtio 1.2, 3.1.1).
    pub fn init() -> Result<Self, &'static str> {
        let base = probe().ok_or(
            "no virtio-blk device (hvbench's VMM and QEMU add one when the run has a disk)",
        )?;
        let rings = alloc_work(4 * PAGE, PAGE).ok_or("no memory for the virtio-blk queue")?;
        let mut d = VirtioBlk {
            base,
            desc: rings,
            avail: rings + PAGE,
            used: rings + 2 * PAGE,
            headers: rings + 3 * PAGE,
            next_avail: 0,
            next_used: 0,
            capacity: 0,
            flush: false,
            in_flight: 0,
        };
        d.reset_and_start()?;
        Ok(d)
    }

    /// Resets the device and sets it up again with an empty queue.
    pub fn reset_and_start(&mut self) -> Result<(), &'static str> {
        let b = self.base;
        write(b, REG_STATUS, 0);
        if read(b, REG_STATUS) != 0 {
            return Err("the virtio-blk device did not reset");
        }
        write(b, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(b, REG_DEVICE_FEATURES_SEL, FEATURE_VERSION_1_WORD);
        if read(b, REG_DEVICE_FEATURES) & FEATURE_VERSION_1_BIT == 0 {
            return Err("the virtio-blk device does not offer VIRTIO_F_VERSION_1 (a legacy transport: QEMU needs -global virtio-mmio.force-legacy=false)");
        }
        write(b, REG_DEVICE_FEATURES_SEL, 0);
        // Only flush, of the block features: one queue, no multi-segment limits needed
        // (one data buffer per request, at most size_max).
        let wanted = read(b, REG_DEVICE_FEATURES) & F_FLUSH;
        self.flush = wanted != 0;
        write(b, REG_DRIVER_FEATURES_SEL, 0);
        write(b, REG_DRIVER_FEATURES, wanted);
        write(b, REG_DRIVER_FEATURES_SEL, FEATURE_VERSION_1_WORD);
        write(b, REG_DRIVER_FEATURES, FEATURE_VERSION_1_BIT);
        let negotiated = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        write(b, REG_STATUS, negotiated);
        if read(b, REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("the virtio-blk device refused the features");
        }
        self.setup_queue()?;
        write(b, REG_STATUS, negotiated | STATUS_DRIVER_OK);
        let low = read(b, REG_CONFIG + CONFIG_CAPACITY) as u64;
        let high = read(b, REG_CONFIG + CONFIG_CAPACITY + 4) as u64;
        self.capacity = ((high << 32) | low).saturating_mul(SECTOR_SIZE);
        Ok(())
    }

    fn setup_queue(&mut self) -> Result<(), &'static str> {
        let b = self.base;
        // SAFETY: the four pages of queue memory this driver allocated.
        unsafe {
            core::ptr::write_bytes(
                self.desc as *mut u8,
                0,
                crate::convert::usize_from(4 * PAGE),
            )
        };
        self.next_avail = 0;
        self.next_used = 0;
        self.in_flight = 0;
        write(b, REG_QUEUE_SEL, QUEUE_REQUEST);
        if read(b, REG_QUEUE_READY) != 0 {
            return Err("the virtio-blk queue was ready before the driver set it up");
        }
        if read(b, REG_QUEUE_NUM_MAX) < QUEUE_SIZE as u32 {
            return Err("the virtio-blk queue is smaller than 256 entries");
        }
        write(b, REG_QUEUE_NUM, QUEUE_SIZE as u32);
        for (low, high, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, self.desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, self.avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, self.used),
        ] {
            write(b, low, low32(addr));
            write(b, high, (addr >> 32) as u32);
        }
        write(b, REG_QUEUE_READY, 1);
        Ok(())
    }

    /// Tag t's header and status byte.
    pub fn header(&self, tag: u16) -> u64 {
        self.headers + HEADER_STRIDE * tag as u64
    }

    pub fn status_byte(&self, tag: u16) -> u8 {
        // SAFETY: the status byte of a tag, in this driver's header page.
        unsafe { read_volatile((self.header(tag) + HEADER_LEN as u64) as *const u8) }
    }

    /// Writes descriptor `i` of the table.
    pub fn set_descriptor(&mut self, i: u16, d: Descriptor) {
        // SAFETY: slot i % 256 of this queue's descriptor table (one page).
        unsafe {
            write_volatile(
                (self.desc + 16 * (i % QUEUE_SIZE) as u64) as *mut Descriptor,
                d,
            )
        };
    }

    /// Writes tag t's header and marks its status pending.
    pub fn set_header(&mut self, tag: u16, kind: u32, sector: u64) {
        let h = self.header(tag);
        // SAFETY: tag t's 32 bytes of the header page.
        unsafe {
            write_volatile(h as *mut u32, kind);
            write_volatile((h + 4) as *mut u32, 0);
            write_volatile((h + 8) as *mut u64, sector);
            write_volatile((h + HEADER_LEN as u64) as *mut u8, STATUS_PENDING);
        }
    }

    /// Offers the chain starting at descriptor `head` (not yet notified).
    pub fn offer(&mut self, head: u16) {
        let slot = self.next_avail % QUEUE_SIZE;
        // SAFETY: the next entry of this queue's available ring.
        unsafe { write_volatile((self.avail + 4 + 2 * slot as u64) as *mut u16, head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        // SAFETY: the available ring's index.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.next_avail) };
    }

    fn tag_busy(&self, tag: u16) -> bool {
        self.in_flight & (1 << tag) != 0
    }
}

impl BlockDevice for VirtioBlk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn slots(&self) -> u16 {
        SLOTS
    }

    fn queue(&mut self, tag: u16, op: Op, offset: u64, buf: u64, len: u32) -> Result<(), BlkError> {
        if tag >= SLOTS || self.tag_busy(tag) {
            return Err(BlkError::BadTag);
        }
        let in_disk = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.capacity);
        let sectors =
            offset.is_multiple_of(SECTOR_SIZE) && (len as u64).is_multiple_of(SECTOR_SIZE);
        let (kind, data) = match op {
            Op::Read => (T_IN, true),
            Op::Write => (T_OUT, true),
            Op::Flush if !self.flush => return Err(BlkError::NoFlush),
            Op::Flush => (T_FLUSH, false),
        };
        if data && (!in_disk || !sectors || len == 0 || len > MAX_REQUEST_BYTES) {
            return Err(BlkError::OutOfRange);
        }
        self.set_header(tag, kind, offset / SECTOR_SIZE);
        let first = tag * PER_REQUEST;
        let header = self.header(tag);
        let status = Descriptor {
            addr: header + HEADER_LEN as u64,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        let mut next = first + 1;
        if data {
            let flags = if op == Op::Read { DESC_F_WRITE } else { 0 };
            self.set_descriptor(
                next,
                Descriptor {
                    addr: buf,
                    len,
                    flags: flags | DESC_F_NEXT,
                    next: next + 1,
                },
            );
            next += 1;
        }
        self.set_descriptor(
            first,
            Descriptor {
                addr: header,
                len: HEADER_LEN,
                flags: DESC_F_NEXT,
                next: first + 1,
            },
        );
        self.set_descriptor(next, status);
        self.in_flight |= 1 << tag;
        self.offer(first);
        Ok(())
    }

    fn kick(&mut self) {
        fence(Ordering::SeqCst);
        write(self.base, REG_QUEUE_NOTIFY, QUEUE_REQUEST);
    }

    fn poll(&mut self) -> Option<Completion> {
        // SAFETY: the used ring's index; the device writes it.
        let used = unsafe { read_volatile((self.used + 2) as *const u16) };
        if used == self.next_used {
            return None;
        }
        fence(Ordering::Acquire);
        let at = self.used + 4 + 8 * (self.next_used % QUEUE_SIZE) as u64;
        // SAFETY: element next_used of the used ring.
        let id = unsafe { read_volatile(at as *const u32) };
        self.next_used = self.next_used.wrapping_add(1);
        // A head the driver did not offer is reported with a tag past the slots.
        let tag = u16::try_from(id / PER_REQUEST as u32).unwrap_or(u16::MAX);
        if tag < SLOTS && id % PER_REQUEST as u32 == 0 {
            self.in_flight &= !(1 << tag);
            return Some(Completion {
                tag,
                status: self.status_byte(tag),
            });
        }
        Some(Completion {
            tag: u16::MAX,
            status: STATUS_PENDING,
        })
    }

    fn needs_reset(&self) -> bool {
        read(self.base, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET != 0
    }
}
