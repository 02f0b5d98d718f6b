//! A minimal virtio-mmio (version 2) driver for the balloon of hvbench's VMM: feature
//! negotiation, split virtqueues in arena memory, one buffer in flight at a time. It runs
//! in user mode (the MMIO page is user-accessible) and polls: the guest has no interrupts,
//! and the VMM handles a queue notification synchronously, on the exit it causes.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use workloads::abi::VIRTIO_BALLOON_BASE;
use workloads::virtio::{
    avail_ring_bytes, desc_table_bytes, used_ring_bytes, BALLOON_QUEUES, CONFIG_ACTUAL,
    CONFIG_NUM_PAGES, DEVICE_ID_BALLOON, FEATURE_VERSION_1_BIT, FEATURE_VERSION_1_WORD, MAGIC,
    PFNS_PER_BUFFER, REG_CONFIG, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID,
    REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_MAGIC, REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY,
    REG_QUEUE_SEL, REG_STATUS, REG_VERSION, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VERSION,
};

use crate::mem::arena::{alloc_work, PAGE};

/// Entries per queue: one buffer is in flight at a time, so a few are plenty.
pub const QUEUE_SIZE: u16 = 16;
/// How often the driver looks for a used buffer before it gives up. The VMM answers during
/// the notification's exit, so the first look normally finds it.
const USED_POLLS: u32 = 1_000_000;

fn reg(offset: u64) -> *mut u32 {
    (VIRTIO_BALLOON_BASE + offset) as *mut u32
}

fn read(offset: u64) -> u32 {
    // SAFETY: a register of the device page, identity-mapped uncached; the VMM emulates it.
    unsafe { read_volatile(reg(offset)) }
}

fn write(offset: u64, value: u32) {
    // SAFETY: as in `read`.
    unsafe { write_volatile(reg(offset), value) }
}

/// One descriptor as the split ring lays it out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Why a transfer did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferError {
    /// The device refused the request and asks for a reset (DEVICE_NEEDS_RESET).
    Refused,
    /// The device neither used the buffer nor flagged an error.
    NoAnswer,
    /// The device returned a buffer the driver did not send.
    WrongBuffer,
    /// A page's PFN does not fit the device's 32 bits (a page beyond 16 TiB).
    PfnTooWide,
}

impl TransferError {
    pub fn message(self) -> &'static str {
        match self {
            TransferError::Refused => {
                "the virtio-balloon device refused a request (DEVICE_NEEDS_RESET)"
            }
            TransferError::NoAnswer => "the virtio-balloon device did not return a buffer",
            TransferError::WrongBuffer => {
                "the virtio-balloon device returned a buffer it was not given"
            }
            TransferError::PfnTooWide => "a page's PFN is wider than the virtio-balloon's 32 bits",
        }
    }
}

/// A split virtqueue in guest memory (identity-mapped: its addresses are physical too).
#[derive(Clone, Copy)]
struct SplitQueue {
    index: u32,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
}

impl SplitQueue {
    fn desc_ptr(&self, i: u16) -> *mut Descriptor {
        (self.desc + 16 * (i % QUEUE_SIZE) as u64) as *mut Descriptor
    }

    fn avail_idx_ptr(&self) -> *mut u16 {
        (self.avail + 2) as *mut u16
    }

    fn avail_slot_ptr(&self, i: u16) -> *mut u16 {
        (self.avail + 4 + 2 * (i % QUEUE_SIZE) as u64) as *mut u16
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring is this queue's memory; the device writes it during exits.
        unsafe { read_volatile((self.used + 2) as *const u16) }
    }

    fn used_id(&self, i: u16) -> u32 {
        // SAFETY: as above; element i of the used ring (id, len).
        unsafe { read_volatile((self.used + 4 + 8 * (i % QUEUE_SIZE) as u64) as *const u32) }
    }
}

/// The balloon device, set up and ready (DRIVER_OK).
pub struct Balloon {
    queues: [SplitQueue; BALLOON_QUEUES],
    /// One page for the PFN array of the buffer in flight.
    buffer: u64,
}

fn zero(addr: u64, bytes: u64) {
    // SAFETY: work memory the caller just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, crate::convert::usize_from(bytes)) };
}

/// Whether hvbench's VMM put a virtio-balloon at [`VIRTIO_BALLOON_BASE`].
pub fn present() -> bool {
    read(REG_MAGIC) == MAGIC
        && read(REG_VERSION) == VERSION
        && read(REG_DEVICE_ID) == DEVICE_ID_BALLOON
}

impl Balloon {
    /// Finds the device and initialises it (virtio 1.2, 3.1.1). Queue memory comes from
    /// the work arena, so it lives until the workload ends.
    pub fn init() -> Result<Self, &'static str> {
        if !present() {
            return Err("no virtio-balloon device at VIRTIO_BALLOON_BASE (hvbench's VMM adds one for mem.balloon)");
        }
        let buffer = alloc_work(PAGE, PAGE).ok_or("no memory for the balloon's buffer")?;
        let mut queues = [SplitQueue {
            index: 0,
            desc: 0,
            avail: 0,
            used: 0,
            next_avail: 0,
            next_used: 0,
        }; BALLOON_QUEUES];
        for (i, q) in (0..).zip(queues.iter_mut()) {
            // One page per area keeps every alignment rule trivially true.
            let base = alloc_work(3 * PAGE, PAGE).ok_or("no memory for the balloon's queues")?;
            debug_assert!(desc_table_bytes(QUEUE_SIZE) <= PAGE);
            debug_assert!(
                avail_ring_bytes(QUEUE_SIZE) <= PAGE && used_ring_bytes(QUEUE_SIZE) <= PAGE
            );
            *q = SplitQueue {
                index: i,
                desc: base,
                avail: base + PAGE,
                used: base + 2 * PAGE,
                next_avail: 0,
                next_used: 0,
            };
        }
        let mut balloon = Balloon { queues, buffer };
        balloon.reset_and_start()?;
        Ok(balloon)
    }

    /// Resets the device and sets it up again with fresh, empty queues.
    pub fn reset_and_start(&mut self) -> Result<(), &'static str> {
        write(REG_STATUS, 0);
        if read(REG_STATUS) != 0 {
            return Err("the virtio-balloon device did not reset");
        }
        write(REG_STATUS, STATUS_ACKNOWLEDGE);
        write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(REG_DEVICE_FEATURES_SEL, FEATURE_VERSION_1_WORD);
        if read(REG_DEVICE_FEATURES) & FEATURE_VERSION_1_BIT == 0 {
            return Err("the virtio-balloon device does not offer VIRTIO_F_VERSION_1");
        }
        // Only VERSION_1: no statistics, free-page hinting or deflate-on-OOM.
        write(REG_DRIVER_FEATURES_SEL, 0);
        write(REG_DRIVER_FEATURES, 0);
        write(REG_DRIVER_FEATURES_SEL, FEATURE_VERSION_1_WORD);
        write(REG_DRIVER_FEATURES, FEATURE_VERSION_1_BIT);
        let negotiated = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        write(REG_STATUS, negotiated);
        if read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("the virtio-balloon device refused the features");
        }
        for q in self.queues.iter_mut() {
            zero(q.desc, 3 * PAGE);
            q.next_avail = 0;
            q.next_used = 0;
            write(REG_QUEUE_SEL, q.index);
            if read(REG_QUEUE_READY) != 0 {
                return Err("a virtio-balloon queue was ready before the driver set it up");
            }
            if read(REG_QUEUE_NUM_MAX) < QUEUE_SIZE as u32 {
                return Err("the virtio-balloon queues are too small");
            }
            write(REG_QUEUE_NUM, QUEUE_SIZE as u32);
            for (low, high, addr) in [
                (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, q.desc),
                (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, q.avail),
                (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, q.used),
            ] {
                write(low, crate::convert::low32(addr));
                write(high, (addr >> 32) as u32);
            }
            write(REG_QUEUE_READY, 1);
        }
        write(REG_STATUS, negotiated | STATUS_DRIVER_OK);
        Ok(())
    }

    pub fn status() -> u32 {
        read(REG_STATUS)
    }

    /// The host's target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        read(REG_CONFIG + CONFIG_NUM_PAGES)
    }

    /// Tells the host how many pages the balloon holds.
    pub fn set_actual(&self, pages: u32) {
        write(REG_CONFIG + CONFIG_ACTUAL, pages);
    }

    /// Hands `count` (at most [`PFNS_PER_BUFFER`]) consecutive pages from `first_pfn` to
    /// the device on `queue` and waits until it has dealt with them.
    pub fn transfer(
        &mut self,
        queue: u32,
        first_pfn: u64,
        count: usize,
    ) -> Result<(), TransferError> {
        let count = count.min(PFNS_PER_BUFFER);
        let pfns = self.buffer as *mut u32;
        for i in 0..count {
            let pfn = u32::try_from(first_pfn + i as u64).map_err(|_| TransferError::PfnTooWide)?;
            // SAFETY: `buffer` is a page of ours; 256 u32s fill a quarter of it.
            unsafe { write_volatile(pfns.add(i), pfn) };
        }
        // count <= PFNS_PER_BUFFER (256): at most 1 KiB.
        #[allow(clippy::cast_possible_truncation)]
        let len = (count * 4) as u32;
        let desc = Descriptor {
            addr: self.buffer,
            len,
            flags: 0,
            next: 0,
        };
        self.submit(queue, &[desc], None)
    }

    /// Puts `chain` (descriptors 0.. of the table, as given) on `queue`, offers its head
    /// (`head`, or 0) and notifies the device; waits for the used buffer. The self-test
    /// passes malformed chains and heads through here.
    pub fn submit(
        &mut self,
        queue: u32,
        chain: &[Descriptor],
        head: Option<u16>,
    ) -> Result<(), TransferError> {
        let q = &mut self.queues[queue as usize % BALLOON_QUEUES];
        for (i, d) in (0..QUEUE_SIZE).zip(chain) {
            // SAFETY: slot i of this queue's descriptor table (i < QUEUE_SIZE).
            unsafe { write_volatile(q.desc_ptr(i), *d) };
        }
        let head = head.unwrap_or(0);
        // SAFETY: the next slot of this queue's available ring.
        unsafe { write_volatile(q.avail_slot_ptr(q.next_avail), head) };
        q.next_avail = q.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        // SAFETY: the available ring's index.
        unsafe { write_volatile(q.avail_idx_ptr(), q.next_avail) };
        fence(Ordering::SeqCst);
        let index = q.index;
        let expected_head = head;
        self.notify_and_wait(index, expected_head)
    }

    /// Moves the available index by `by` without offering buffers (the self-test's lie
    /// about how much work is queued) and notifies.
    pub fn bump_avail_index(&mut self, queue: u32, by: u16) -> Result<(), TransferError> {
        let q = &mut self.queues[queue as usize % BALLOON_QUEUES];
        q.next_avail = q.next_avail.wrapping_add(by);
        fence(Ordering::SeqCst);
        // SAFETY: the available ring's index.
        unsafe { write_volatile(q.avail_idx_ptr(), q.next_avail) };
        let index = q.index;
        self.notify_and_wait(index, 0)
    }

    fn notify_and_wait(&mut self, queue: u32, head: u16) -> Result<(), TransferError> {
        write(REG_QUEUE_NOTIFY, queue);
        let q = &mut self.queues[queue as usize % BALLOON_QUEUES];
        for poll in 0..USED_POLLS {
            if q.used_idx() != q.next_used {
                let id = q.used_id(q.next_used);
                q.next_used = q.next_used.wrapping_add(1);
                return if id == head as u32 {
                    Ok(())
                } else {
                    Err(TransferError::WrongBuffer)
                };
            }
            // The status register costs an exit: look at it now and then.
            if poll % 1024 == 0 && Self::status() & STATUS_DEVICE_NEEDS_RESET != 0 {
                return Err(TransferError::Refused);
            }
            core::hint::spin_loop();
        }
        Err(TransferError::NoAnswer)
    }
}
