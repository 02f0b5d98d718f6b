//! A virtio-balloon device (traditional balloon, device ID 5) on the virtio-mmio transport,
//! version 2, for `mem.balloon`. Queues are split virtqueues read with the `virtio-queue`
//! crate over the VM's `vm-memory`; the device runs on the vCPU thread, during the exit the
//! guest's queue notification causes, so a request is done when the notifying store
//! retires. There is no interrupt controller: the driver polls the used rings and the
//! configuration space.
//!
//! Inflated pages are dropped from the host with `madvise(MADV_DONTNEED)` (the process's
//! resident memory falls; the guest reads zeros if it touches them again). Deflated pages
//! need nothing: the next touch faults a fresh zero page in.
//!
//! The guest is untrusted. Every request is checked whole before any page is released:
//! the head index, each descriptor's direction, length and address, the chain's shape and
//! every PFN must be valid, or the request is refused, the device sets
//! DEVICE_NEEDS_RESET, stops using that queue until the driver resets it, and the refusal
//! is kept for the host (the record's reason).

use std::num::Wrapping;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use workloads::virtio::{
    BALLOON_PFN_SHIFT, BALLOON_QUEUES, CONFIG_ACTUAL, CONFIG_LEN, CONFIG_NUM_PAGES,
    DEVICE_ID_BALLOON, QUEUE_DEFLATE, QUEUE_INFLATE, QUEUE_SIZE_MAX, REG_CONFIG,
};

use super::virtio_mmio::{self, Effect, Transport};
use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// Most PFNs one request may carry (16 KiB of PFN array): bounds the work and the memory one
/// notification can make the VMM spend. Linux sends 256.
pub(crate) const MAX_PFNS_PER_REQUEST: usize = 4096;
/// Refusals kept word for word; later ones are only counted.
const MAX_ERRORS_KEPT: usize = 16;
const PAGE_SIZE: u64 = 1 << BALLOON_PFN_SHIFT;
/// Bytes of [`VirtioBalloon::save`].
const SAVED_BYTES: usize =
    virtio_mmio::TRANSPORT_BYTES + BALLOON_QUEUES * virtio_mmio::QUEUE_BYTES + 4 * 4 + 2 * 8;

/// Requests the VMM refused (kept word for word up to a limit, and counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    pub kept: Vec<String>,
    pub total: u64,
}

/// Why the device refused a request or a notification.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub(crate) enum RequestError {
    #[error("the guest notified queue {queue}, which does not exist")]
    NoSuchQueue { queue: u32 },
    #[error(
        "the guest notified queue {queue} before finishing its set-up (DRIVER_OK, QueueReady)"
    )]
    NotReady { queue: u32 },
    #[error("queue {queue}'s rings lie outside guest RAM")]
    RingsOutsideRam { queue: u32 },
    #[error("cannot read queue {queue}'s available ring")]
    AvailRingUnreadable { queue: u32 },
    #[error("queue {queue}'s available index moved by {moved}, more than its {size} entries")]
    AvailIndexJump { queue: u32, moved: u16, size: u16 },
    #[error("head index {head} on queue {queue} is outside the queue ({size} entries)")]
    HeadOutsideQueue { queue: u32, head: u16, size: u16 },
    #[error(
        "the descriptor chain from head {head} on queue {queue} is broken (a next index \
         outside the queue, an unreadable or nested indirect table, or a loop)"
    )]
    BrokenChain { queue: u32, head: u16 },
    #[error(
        "a buffer at {addr:#x} on queue {queue} is device-writable; balloon buffers are \
         device-readable PFN arrays"
    )]
    WriteOnlyBuffer { queue: u32, addr: u64 },
    #[error("a buffer of {len} bytes on queue {queue} is not a whole number of 4-byte PFNs")]
    RaggedLength { queue: u32, len: u32 },
    #[error(
        "a request of {bytes} bytes on queue {queue} is larger than the {max} bytes of PFNs \
         the device reads per request"
    )]
    Oversized { queue: u32, bytes: u64, max: usize },
    #[error("a buffer at {addr:#x} ({len} bytes) on queue {queue} is outside guest RAM")]
    BufferOutsideRam { queue: u32, addr: u64, len: u32 },
    #[error("PFN {pfn:#x} (guest-physical {addr:#x}) on queue {queue} is outside guest RAM")]
    PfnOutsideRam { queue: u32, pfn: u32, addr: u64 },
    #[error("cannot write queue {queue}'s used ring")]
    UsedRingUnwritable { queue: u32 },
    #[error(
        "madvise(MADV_DONTNEED) of {len} bytes at guest-physical {addr:#x} failed: {}",
        std::io::Error::from_raw_os_error(*errno)
    )]
    Madvise { addr: u64, len: u64, errno: i32 },
}

/// What the device and the host's handle share.
#[derive(Debug, Default)]
struct Shared {
    /// The host's target (`num_pages`), in 4 KiB pages.
    target_pages: AtomicU32,
    /// What the driver says the balloon holds (`actual`).
    actual_pages: AtomicU32,
    config_generation: AtomicU32,
    /// Pages released to the host and taken back, over the device's life.
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    refusals: Mutex<Refusals>,
}

impl Shared {
    fn refusal_log(&self) -> std::sync::MutexGuard<'_, Refusals> {
        // The log is whole after any panic of a holder: a push and a count.
        self.refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The host's side of the balloon: sets the target, reads what the guest did, and measures
/// how much of the guest's RAM is resident. Cheap to clone; it keeps the guest RAM mapping
/// alive, so measuring it after the VM has stopped is still sound.
#[derive(Clone, Debug)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    memory: GuestMemory,
}

impl BalloonHandle {
    /// Sets `num_pages`, the number of 4 KiB pages the host wants back.
    pub fn set_target_pages(&self, pages: u32) {
        self.shared.target_pages.store(pages, Ordering::Release);
        self.shared.config_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn target_pages(&self) -> u32 {
        self.shared.target_pages.load(Ordering::Acquire)
    }

    /// `actual`: the pages the driver says it handed over.
    pub fn actual_pages(&self) -> u32 {
        self.shared.actual_pages.load(Ordering::Acquire)
    }

    pub fn inflated_pages(&self) -> u64 {
        self.shared.inflated_pages.load(Ordering::Acquire)
    }

    pub fn deflated_pages(&self) -> u64 {
        self.shared.deflated_pages.load(Ordering::Acquire)
    }

    pub fn refusals(&self) -> Refusals {
        self.shared.refusal_log().clone()
    }

    /// Bytes of guest RAM resident in this process now (mincore over the guest's mapping):
    /// exactly the memory the host spends on the guest's RAM, whatever else the process
    /// (or other VMs in it) holds.
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        let page = page_size();
        let mut resident = 0u64;
        for region in self.memory.iter() {
            let len = u64_to_usize(region.len());
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut vector = vec![0u8; len.div_ceil(page)];
            // SAFETY: `host` and `len` describe one whole mapping of guest RAM, kept alive by
            // `self.memory`; mincore only reads the page tables and writes one byte per page
            // into `vector`, which holds one byte for every page of the range.
            let rc = unsafe { libc::mincore(host.cast(), len, vector.as_mut_ptr()) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            resident += vector.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64;
        }
        Ok(resident)
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.len()).sum()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(4096)
}

/// The device, owned by the vCPU thread.
#[derive(Debug)]
pub(crate) struct VirtioBalloon {
    memory: GuestMemory,
    shared: Arc<Shared>,
    transport: Transport,
    queues: [Queue; BALLOON_QUEUES],
    /// Set on a refused request; cleared by the driver's reset.
    needs_reset: bool,
}

impl VirtioBalloon {
    /// A device over `memory`, and the host's handle on it.
    pub(crate) fn new(memory: GuestMemory) -> Result<(Self, BalloonHandle), virtio_queue::Error> {
        let shared = Arc::new(Shared::default());
        let handle = BalloonHandle {
            shared: shared.clone(),
            memory: memory.clone(),
        };
        let device = VirtioBalloon {
            memory,
            shared,
            transport: Transport::new(DEVICE_ID_BALLOON, 0),
            queues: [Queue::new(QUEUE_SIZE_MAX)?, Queue::new(QUEUE_SIZE_MAX)?],
            needs_reset: false,
        };
        Ok((device, handle))
    }

    /// The device's state for a migration: the transport, both queues, whether it
    /// needs a reset, the target, `actual`, the configuration generation and the counts.
    pub(crate) fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SAVED_BYTES);
        out.extend(self.transport.encode());
        for q in &self.queues {
            out.extend(virtio_mmio::encode_queue(q));
        }
        let sh = &self.shared;
        for word in [
            u32::from(self.needs_reset),
            sh.target_pages.load(Ordering::Acquire),
            sh.actual_pages.load(Ordering::Acquire),
            sh.config_generation.load(Ordering::Acquire),
        ] {
            out.extend(word.to_le_bytes());
        }
        out.extend(sh.inflated_pages.load(Ordering::Acquire).to_le_bytes());
        out.extend(sh.deflated_pages.load(Ordering::Acquire).to_le_bytes());
        out
    }

    /// A device over `memory` as [`VirtioBalloon::save`] left it (checked: a stream
    /// cannot give it a state a driver could not).
    pub(crate) fn restore(memory: GuestMemory, b: &[u8]) -> Result<(Self, BalloonHandle), String> {
        if b.len() != SAVED_BYTES {
            return Err(format!(
                "balloon state of {} bytes, not {SAVED_BYTES}",
                b.len()
            ));
        }
        let (mut device, handle) = VirtioBalloon::new(memory).map_err(|e| e.to_string())?;
        let t = virtio_mmio::TRANSPORT_BYTES;
        let q = virtio_mmio::QUEUE_BYTES;
        device.transport = Transport::decode(DEVICE_ID_BALLOON, 0, &b[..t])?;
        for (i, queue) in device.queues.iter_mut().enumerate() {
            *queue = virtio_mmio::decode_queue(&b[t + i * q..t + (i + 1) * q], QUEUE_SIZE_MAX)?;
        }
        let rest = &b[t + BALLOON_QUEUES * q..];
        let word =
            |i: usize| u32::from_le_bytes(rest[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]));
        let long = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().unwrap_or([0; 8]));
        device.needs_reset = word(0) != 0;
        let sh = &device.shared;
        sh.target_pages.store(word(1), Ordering::Release);
        sh.actual_pages.store(word(2), Ordering::Release);
        sh.config_generation.store(word(3), Ordering::Release);
        sh.inflated_pages.store(long(16), Ordering::Release);
        sh.deflated_pages.store(long(24), Ordering::Release);
        Ok((device, handle))
    }

    /// A read of `data.len()` bytes at `offset` into the device's page.
    pub(crate) fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            virtio_mmio::read_config(&self.config_bytes(), offset, data);
            return;
        }
        let generation = self.shared.config_generation.load(Ordering::Acquire);
        self.transport
            .read(offset, data, &self.queues, self.needs_reset, generation);
    }

    fn config_bytes(&self) -> [u8; u64_to_usize(CONFIG_LEN)] {
        let mut config = [0u8; u64_to_usize(CONFIG_LEN)];
        let num = self.shared.target_pages.load(Ordering::Acquire);
        let actual = self.shared.actual_pages.load(Ordering::Acquire);
        config[u64_to_usize(CONFIG_NUM_PAGES)..][..4].copy_from_slice(&num.to_le_bytes());
        config[u64_to_usize(CONFIG_ACTUAL)..][..4].copy_from_slice(&actual.to_le_bytes());
        config
    }

    /// A write of `data` at `offset` into the device's page.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // Only `actual` is the driver's to write, as one 32-bit word.
            if offset == REG_CONFIG + CONFIG_ACTUAL && data.len() == 4 {
                let actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.shared.actual_pages.store(actual, Ordering::Release);
            }
            return;
        }
        match self.transport.write(offset, data, &mut self.queues) {
            Effect::None => {}
            Effect::Reset => {
                self.needs_reset = false;
                self.shared.actual_pages.store(0, Ordering::Release);
            }
            Effect::Notify(queue) => self.notify(queue),
        }
    }

    /// The driver's notification of `queue`: serve every buffer it made available.
    fn notify(&mut self, queue: u32) {
        // A device that asked for a reset serves nothing until it gets one.
        if self.needs_reset {
            return;
        }
        if let Err(refusal) = self.serve(queue) {
            self.refuse(refusal);
        }
    }

    fn refuse(&mut self, refusal: RequestError) {
        self.needs_reset = true;
        let mut log = self.shared.refusal_log();
        log.total += 1;
        if log.kept.len() < MAX_ERRORS_KEPT {
            log.kept.push(refusal.to_string());
        }
    }

    fn serve(&mut self, queue_index: u32) -> Result<(), RequestError> {
        let queue = self
            .queues
            .get_mut(queue_index as usize)
            .ok_or(RequestError::NoSuchQueue { queue: queue_index })?;
        if !self.transport.driver_ok() || !queue.ready() {
            return Err(RequestError::NotReady { queue: queue_index });
        }
        let mem = &self.memory;
        if !queue.is_valid(mem) {
            return Err(RequestError::RingsOutsideRam { queue: queue_index });
        }
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| RequestError::AvailRingUnreadable { queue: queue_index })?;
        let moved = (avail - Wrapping(queue.next_avail())).0;
        if moved > queue.size() {
            return Err(RequestError::AvailIndexJump {
                queue: queue_index,
                moved,
                size: queue.size(),
            });
        }
        for _ in 0..moved {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Err(RequestError::AvailRingUnreadable { queue: queue_index });
            };
            let head = chain.head_index();
            let pfns = read_request(mem, queue_index, queue.size(), chain)?;
            let pages = pfns.len() as u64;
            if queue_index == QUEUE_INFLATE {
                // Released pages read as zero from now on: a migration must send them so.
                let released = release(mem, &pfns);
                for &pfn in &pfns {
                    let addr = GuestAddress(u64::from(pfn) << BALLOON_PFN_SHIFT);
                    crate::vstate::memory::mark_dirty(mem, addr, u64_to_usize(PAGE_SIZE));
                }
                released?;
                self.shared
                    .inflated_pages
                    .fetch_add(pages, Ordering::AcqRel);
            } else if queue_index == QUEUE_DEFLATE {
                // Nothing to do: the next touch faults a fresh page in.
                self.shared
                    .deflated_pages
                    .fetch_add(pages, Ordering::AcqRel);
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|_| RequestError::UsedRingUnwritable { queue: queue_index })?;
        }
        Ok(())
    }
}

/// Reads and checks one request: every descriptor device-readable, whole PFNs, inside RAM,
/// the chain whole; then every PFN inside RAM. Nothing is released before all of it holds.
fn read_request(
    mem: &GuestMemory,
    queue: u32,
    size: u16,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<Vec<u32>, RequestError> {
    let head = chain.head_index();
    if head >= size {
        return Err(RequestError::HeadOutsideQueue { queue, head, size });
    }
    let mut pfns: Vec<u32> = Vec::new();
    let mut descriptors = 0usize;
    let mut continues = false;
    for desc in chain {
        descriptors += 1;
        continues = desc.has_next();
        let addr = desc.addr().raw_value();
        if desc.is_write_only() {
            return Err(RequestError::WriteOnlyBuffer { queue, addr });
        }
        let len = desc.len();
        if len == 0 || !len.is_multiple_of(4) {
            return Err(RequestError::RaggedLength { queue, len });
        }
        let bytes = pfns.len() as u64 * 4 + len as u64;
        if bytes > (MAX_PFNS_PER_REQUEST * 4) as u64 {
            return Err(RequestError::Oversized {
                queue,
                bytes,
                max: MAX_PFNS_PER_REQUEST * 4,
            });
        }
        let mut raw = vec![0u8; len as usize];
        mem.read_slice(&mut raw, desc.addr())
            .map_err(|_| RequestError::BufferOutsideRam { queue, addr, len })?;
        pfns.extend(
            raw.chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
        );
    }
    // The crate ends a chain quietly where it breaks: a last descriptor that still points
    // on, or no descriptor at all, means the chain was cut.
    if descriptors == 0 || continues {
        return Err(RequestError::BrokenChain { queue, head });
    }
    for &pfn in &pfns {
        let addr = (pfn as u64) << BALLOON_PFN_SHIFT;
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), u64_to_usize(PAGE_SIZE)) {
            return Err(RequestError::PfnOutsideRam { queue, pfn, addr });
        }
    }
    Ok(pfns)
}

/// Gives the pages back to the host, one `madvise` per run of consecutive PFNs.
fn release(mem: &GuestMemory, pfns: &[u32]) -> Result<(), RequestError> {
    let mut i = 0;
    while i < pfns.len() {
        let mut run = 1;
        while i + run < pfns.len() && pfns[i + run] as u64 == pfns[i] as u64 + run as u64 {
            run += 1;
        }
        let addr = (pfns[i] as u64) << BALLOON_PFN_SHIFT;
        let len = run as u64 * PAGE_SIZE;
        match mem.get_slice(GuestAddress(addr), u64_to_usize(len)) {
            Ok(slice) => drop_pages(addr, slice.ptr_guard_mut().as_ptr(), len)?,
            // A run across two regions: page by page (each page was checked to be RAM).
            Err(_) => {
                for p in 0..run as u64 {
                    let page = addr + p * PAGE_SIZE;
                    let slice = mem
                        .get_slice(GuestAddress(page), u64_to_usize(PAGE_SIZE))
                        .map_err(|_| RequestError::PfnOutsideRam {
                            queue: QUEUE_INFLATE,
                            pfn: u32::try_from(page >> BALLOON_PFN_SHIFT).unwrap_or(u32::MAX),
                            addr: page,
                        })?;
                    drop_pages(page, slice.ptr_guard_mut().as_ptr(), PAGE_SIZE)?;
                }
            }
        }
        i += run;
    }
    Ok(())
}

fn drop_pages(addr: u64, host: *mut u8, len: u64) -> Result<(), RequestError> {
    // SAFETY: `host..host + len` lies inside one region of guest RAM (vm-memory checked the
    // range), a private anonymous mapping that `GuestMemory` keeps alive. MADV_DONTNEED only
    // replaces its contents with zero pages on the next access; nothing in the VMM holds a
    // Rust reference into guest RAM (all access is through volatile copies).
    let rc = unsafe { libc::madvise(host.cast(), u64_to_usize(len), libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(RequestError::Madvise {
            addr,
            len,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The device driven the way a guest drives it: registers through `read`/`write`, rings
    //! and buffers written into guest memory by hand (not with the crate the device uses).

    use super::*;
    use crate::vstate::memory;
    use workloads::virtio::*;

    const MIB: u64 = 1 << 20;
    const QUEUE_SIZE: u16 = 16;
    /// Where the test driver keeps each queue's areas and its PFN lists.
    const RINGS: [u64; 2] = [0x10_0000, 0x11_0000];
    const LIST: u64 = 0x20_0000;
    /// Pages the tests hand over; their contents show whether they were released.
    const VICTIM_PFN: u32 = 0x300;

    struct TestDriver {
        device: VirtioBalloon,
        handle: BalloonHandle,
        mem: GuestMemory,
        next_avail: [u16; 2],
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    }

    impl TestDriver {
        fn new() -> Self {
            let mem = memory::allocate(16).unwrap();
            let (device, handle) = VirtioBalloon::new(mem.clone()).unwrap();
            let mut d = TestDriver {
                device,
                handle,
                mem,
                next_avail: [0; 2],
            };
            d.start(true);
            d
        }

        fn set(&mut self, offset: u64, value: u32) {
            self.device.write(offset, &value.to_le_bytes());
        }

        fn get(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.device.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        /// Virtio 1.2, 3.1.1, with VERSION_1 accepted (or not).
        fn start(&mut self, modern: bool) {
            self.set(REG_STATUS, 0);
            self.next_avail = [0; 2];
            for (i, base) in RINGS.iter().enumerate() {
                self.mem
                    .write_slice(&[0u8; 0x3000], GuestAddress(*base))
                    .unwrap();
                let _ = i;
            }
            self.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.set(REG_DRIVER_FEATURES_SEL, 1);
            self.set(REG_DRIVER_FEATURES, if modern { 1 } else { 0 });
            self.set(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            );
            for (q, base) in RINGS.iter().enumerate() {
                self.set(REG_QUEUE_SEL, u32::try_from(q).unwrap());
                self.set(REG_QUEUE_NUM, QUEUE_SIZE as u32);
                self.set(REG_QUEUE_DESC_LOW, u32::try_from(*base).unwrap());
                self.set(REG_QUEUE_DRIVER_LOW, u32::try_from(*base + 0x1000).unwrap());
                self.set(REG_QUEUE_DEVICE_LOW, u32::try_from(*base + 0x2000).unwrap());
                self.set(REG_QUEUE_READY, 1);
            }
            self.set(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
        }

        /// Writes `descs` at table slots 0.., offers `head` and notifies queue `q`.
        fn offer(&mut self, q: usize, descs: &[[u8; 16]], head: u16) {
            for (i, d) in descs.iter().enumerate() {
                self.mem
                    .write_slice(d, GuestAddress(RINGS[q] + 16 * i as u64))
                    .unwrap();
            }
            let slot = self.next_avail[q] % QUEUE_SIZE;
            let avail = RINGS[q] + 0x1000;
            self.mem
                .write_obj(head, GuestAddress(avail + 4 + 2 * slot as u64))
                .unwrap();
            self.next_avail[q] = self.next_avail[q].wrapping_add(1);
            self.mem
                .write_obj(self.next_avail[q], GuestAddress(avail + 2))
                .unwrap();
            self.set(REG_QUEUE_NOTIFY, u32::try_from(q).unwrap());
        }

        fn pfn_list(&self, pfns: &[u32]) -> u64 {
            for (i, p) in pfns.iter().enumerate() {
                self.mem
                    .write_obj(*p, GuestAddress(LIST + 4 * i as u64))
                    .unwrap();
            }
            LIST
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem
                .read_obj(GuestAddress(RINGS[q] + 0x2000 + 2))
                .unwrap()
        }

        fn needs_reset(&mut self) -> bool {
            self.get(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET != 0
        }

        fn mark(&self, pfn: u32) {
            let addr = GuestAddress((pfn as u64) << 12);
            self.mem.write_slice(&[0xa5; 4096], addr).unwrap();
        }

        fn marked(&self, pfn: u32) -> bool {
            let mut page = [0u8; 4096];
            self.mem
                .read_slice(&mut page, GuestAddress((pfn as u64) << 12))
                .unwrap();
            page.iter().all(|b| *b == 0xa5)
        }
    }

    #[test]
    fn identifies_itself_as_a_modern_balloon() {
        let mut d = TestDriver::new();
        assert_eq!(d.get(REG_MAGIC), MAGIC);
        assert_eq!(d.get(REG_VERSION), 2);
        assert_eq!(d.get(REG_DEVICE_ID), 5);
        d.set(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.get(REG_DEVICE_FEATURES), FEATURE_VERSION_1_BIT);
        d.set(REG_QUEUE_SEL, 0);
        assert_eq!(d.get(REG_QUEUE_NUM_MAX), QUEUE_SIZE_MAX as u32);
        d.set(REG_QUEUE_SEL, 2);
        assert_eq!(d.get(REG_QUEUE_NUM_MAX), 0, "only two queues");
        assert_ne!(d.get(REG_STATUS) & STATUS_DRIVER_OK, 0);
        // Registers are whole words: other widths read as zero and write nothing.
        let mut odd = [0xffu8; 2];
        d.device.read(REG_MAGIC, &mut odd);
        assert_eq!(odd, [0, 0]);
        d.device.write(REG_STATUS, &[0]);
        assert_ne!(d.get(REG_STATUS), 0);
    }

    #[test]
    fn a_driver_without_version_1_is_refused() {
        let mut d = TestDriver::new();
        d.start(false);
        assert_eq!(
            d.get(REG_STATUS) & (STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            0
        );
        // Features the device never offered are refused too.
        d.set(REG_STATUS, 0);
        d.set(REG_DRIVER_FEATURES_SEL, 0);
        d.set(REG_DRIVER_FEATURES, 1 << 2);
        d.set(REG_DRIVER_FEATURES_SEL, 1);
        d.set(REG_DRIVER_FEATURES, 1);
        d.set(REG_STATUS, STATUS_FEATURES_OK);
        assert_eq!(d.get(REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn config_space_carries_the_target_and_actual() {
        let mut d = TestDriver::new();
        let generation = d.get(REG_CONFIG_GENERATION);
        d.handle.set_target_pages(16384);
        assert_eq!(d.get(REG_CONFIG + CONFIG_NUM_PAGES), 16384);
        assert_ne!(d.get(REG_CONFIG_GENERATION), generation);
        d.set(REG_CONFIG + CONFIG_ACTUAL, 77);
        assert_eq!(d.handle.actual_pages(), 77);
        // num_pages is the host's: the driver cannot write it.
        d.set(REG_CONFIG + CONFIG_NUM_PAGES, 5);
        assert_eq!(d.handle.target_pages(), 16384);
        // Byte reads of the config space work; beyond it, zeros.
        let mut b = [0u8; 2];
        d.device.read(REG_CONFIG + CONFIG_NUM_PAGES + 1, &mut b);
        assert_eq!(b, [0x40, 0]);
        d.device.read(0xffe, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn inflate_releases_the_pages_and_deflate_only_acknowledges() {
        let mut d = TestDriver::new();
        // 1 MiB touched, then handed over: residency falls by at least that much.
        let first = VICTIM_PFN;
        let pages = u32::try_from(MIB / 4096).unwrap();
        for p in first..first + pages {
            d.mark(p);
        }
        let pfns: Vec<u32> = (first..first + pages).collect();
        let list = d.pfn_list(&pfns);
        let before = d.handle.resident_bytes().unwrap();
        d.offer(0, &[desc(list, 4 * pages, 0, 0)], 0);
        assert_eq!(d.used_idx(0), 1, "the buffer came back");
        assert!(!d.needs_reset());
        // Measured before the pages are read again (a read maps the zero page back in).
        let after = d.handle.resident_bytes().unwrap();
        assert_eq!(before - after, MIB, "{before} -> {after}");
        assert!(
            !d.marked(first) && !d.marked(first + pages - 1),
            "released pages read as zeros"
        );
        assert_eq!(d.handle.inflated_pages(), pages as u64);

        d.mark(first);
        let list = d.pfn_list(&[first]);
        d.offer(1, &[desc(list, 4, 0, 0)], 0);
        assert_eq!(d.used_idx(1), 1);
        assert!(d.marked(first), "deflate leaves memory alone");
        assert_eq!(d.handle.deflated_pages(), 1);
        assert_eq!(d.handle.refusals(), Refusals::default());
    }

    #[test]
    fn a_request_split_over_a_chain_is_served_whole() {
        let mut d = TestDriver::new();
        d.mark(VICTIM_PFN);
        d.mark(VICTIM_PFN + 1);
        let list = d.pfn_list(&[VICTIM_PFN, VICTIM_PFN + 1]);
        d.offer(
            0,
            &[desc(list, 4, DESC_F_NEXT, 1), desc(list + 4, 4, 0, 0)],
            0,
        );
        assert_eq!(d.used_idx(0), 1);
        assert!(!d.marked(VICTIM_PFN) && !d.marked(VICTIM_PFN + 1));
    }

    /// One malformed request on a fresh device: refused, nothing released, nothing used.
    fn refused(setup: impl FnOnce(&mut TestDriver), expect: &str) {
        let mut d = TestDriver::new();
        d.mark(VICTIM_PFN);
        setup(&mut d);
        assert!(d.needs_reset(), "{expect}: no DEVICE_NEEDS_RESET");
        assert_eq!(d.used_idx(0), 0, "{expect}: a buffer came back");
        assert_eq!(d.used_idx(1), 0, "{expect}: a buffer came back");
        assert!(d.marked(VICTIM_PFN), "{expect}: a page was released");
        assert_eq!(d.handle.inflated_pages(), 0);
        let r = d.handle.refusals();
        assert_eq!(r.total, 1, "{expect}: {r:?}");
        assert!(
            r.kept[0].contains(expect),
            "{:?} lacks {expect:?}",
            r.kept[0]
        );
        // Until it is reset, the device serves nothing, not even a valid request.
        let list = d.pfn_list(&[VICTIM_PFN]);
        d.offer(0, &[desc(list, 4, 0, 0)], 0);
        assert!(d.marked(VICTIM_PFN));
        // After a reset it serves again.
        d.start(true);
        assert!(!d.needs_reset());
        let list = d.pfn_list(&[VICTIM_PFN]);
        d.offer(0, &[desc(list, 4, 0, 0)], 0);
        assert_eq!(d.used_idx(0), 1, "{expect}: no recovery after reset");
        assert!(!d.marked(VICTIM_PFN));
    }

    #[test]
    fn malformed_requests_are_refused_without_releasing_anything() {
        let outside = 64 * MIB;
        let outside_pfn = u32::try_from(outside >> 12).unwrap();
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(0, &[desc(l, 4, 0, 0)], QUEUE_SIZE + 3)
            },
            "outside the queue",
        );
        refused(
            |d| d.offer(0, &[desc(outside, 4, 0, 0)], 0),
            "buffer at 0x4000000 (4 bytes) on queue 0 is outside guest RAM",
        );
        refused(
            |d| d.offer(0, &[desc(16 * MIB - 4, 8, 0, 0)], 0),
            "outside guest RAM",
        );
        refused(
            |d| d.offer(0, &[desc(u64::MAX - 3, 8, 0, 0)], 0),
            "outside guest RAM",
        );
        // The victim first: a device that released page by page would lose it.
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN, outside_pfn]);
                d.offer(0, &[desc(l, 8, 0, 0)], 0)
            },
            "PFN 0x4000 (guest-physical 0x4000000) on queue 0 is outside guest RAM",
        );
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN, u32::MAX]);
                d.offer(0, &[desc(l, 8, 0, 0)], 0)
            },
            "PFN 0xffffffff",
        );
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(0, &[desc(l, 4, DESC_F_WRITE, 0)], 0)
            },
            "device-writable",
        );
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(0, &[desc(l, 6, 0, 0)], 0)
            },
            "not a whole number",
        );
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(0, &[desc(l, 0, 0, 0)], 0)
            },
            "not a whole number",
        );
        refused(
            |d| {
                d.offer(
                    0,
                    &[desc(
                        LIST,
                        4 * u32::try_from(MAX_PFNS_PER_REQUEST).unwrap() + 4,
                        0,
                        0,
                    )],
                    0,
                )
            },
            "larger than the 16384 bytes",
        );
        // Many small descriptors add up to too much too.
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                let big = u32::try_from(4 * MAX_PFNS_PER_REQUEST / 2).unwrap();
                d.offer(
                    0,
                    &[desc(l, big, DESC_F_NEXT, 1), desc(l, big + 4, 0, 0)],
                    0,
                )
            },
            "larger than",
        );
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(0, &[desc(l, 4, DESC_F_NEXT, QUEUE_SIZE * 4)], 0)
            },
            "is broken",
        );
        // A loop: 0 -> 1 -> 0 -> ...
        refused(
            |d| {
                let l = d.pfn_list(&[VICTIM_PFN]);
                d.offer(
                    0,
                    &[desc(l, 4, DESC_F_NEXT, 1), desc(l, 4, DESC_F_NEXT, 0)],
                    0,
                )
            },
            "is broken",
        );
        // An indirect table outside RAM (the feature is not offered either).
        refused(
            |d| d.offer(0, &[desc(outside, 32, DESC_F_INDIRECT, 0)], 0),
            "is broken",
        );
        refused(
            |d| {
                d.mem
                    .write_obj(200u16, GuestAddress(RINGS[1] + 0x1000 + 2))
                    .unwrap();
                d.set(REG_QUEUE_NOTIFY, 1);
            },
            "moved by 200",
        );
        refused(
            |d| d.set(REG_QUEUE_NOTIFY, 7),
            "queue 7, which does not exist",
        );
        refused(
            |d| {
                d.set(REG_STATUS, 0);
                d.set(REG_QUEUE_NOTIFY, 0);
            },
            "before finishing its set-up",
        );
        refused(
            |d| {
                // Rings beyond RAM, set before the queue is made ready.
                d.set(REG_STATUS, 0);
                d.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                d.set(REG_DRIVER_FEATURES_SEL, 1);
                d.set(REG_DRIVER_FEATURES, 1);
                d.set(
                    REG_STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                );
                d.set(REG_QUEUE_SEL, 0);
                d.set(REG_QUEUE_NUM, QUEUE_SIZE as u32);
                d.set(REG_QUEUE_DESC_LOW, 0);
                d.set(REG_QUEUE_DESC_HIGH, 1);
                d.set(
                    REG_QUEUE_DRIVER_LOW,
                    u32::try_from(RINGS[0] + 0x1000).unwrap(),
                );
                d.set(
                    REG_QUEUE_DEVICE_LOW,
                    u32::try_from(RINGS[0] + 0x2000).unwrap(),
                );
                d.set(REG_QUEUE_READY, 1);
                d.set(
                    REG_STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                );
                d.set(REG_QUEUE_NOTIFY, 0);
            },
            "rings lie outside guest RAM",
        );
    }

    #[test]
    fn queue_set_up_is_frozen_while_the_driver_runs() {
        let mut d = TestDriver::new();
        d.set(REG_QUEUE_SEL, 0);
        d.set(REG_QUEUE_DESC_LOW, 0x7000_0000);
        // Still served from the rings set up before DRIVER_OK.
        let list = d.pfn_list(&[VICTIM_PFN]);
        d.offer(0, &[desc(list, 4, 0, 0)], 0);
        assert_eq!(d.used_idx(0), 1);
        assert!(!d.needs_reset());
    }

    #[test]
    fn random_register_and_ring_garbage_never_panics() {
        let mut d = TestDriver::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            match r % 5 {
                0 => {
                    // Garbage in the rings, the descriptor table and the PFN list.
                    let at = RINGS[(r >> 8) as usize % 2] + (next() % 0x3000);
                    let _ = d
                        .mem
                        .write_obj((next() & 0xffff_ffff) as u32, GuestAddress(at));
                    let _ = d.mem.write_obj(
                        (next() & 0xffff_ffff) as u32,
                        GuestAddress(LIST + next() % 64),
                    );
                }
                1 => d.set(REG_QUEUE_NOTIFY, (next() % 3) as u32),
                2 => {
                    let offset = next() % 0x1100;
                    d.set(offset & !3, (next() & 0xffff_ffff) as u32);
                }
                3 => {
                    let mut buf = [0u8; 8];
                    let len = 1 + (next() % 8) as usize;
                    d.device.read(next() % 0x1100, &mut buf[..len]);
                }
                _ => {
                    if next() % 50 == 0 {
                        d.start(true);
                    }
                }
            }
        }
        // The guest RAM mapping survived: it can still be measured.
        d.handle.resident_bytes().unwrap();
    }

    #[test]
    fn a_restored_balloon_goes_on_where_the_saved_one_was() {
        let mut d = TestDriver::new();
        d.handle.set_target_pages(8);
        d.mark(VICTIM_PFN);
        let list = d.pfn_list(&[VICTIM_PFN]);
        d.offer(0, &[desc(list, 4, 0, 0)], 0);
        assert_eq!(d.used_idx(0), 1);
        let saved = d.device.save();
        let (device, handle) = VirtioBalloon::restore(d.mem.clone(), &saved).unwrap();
        assert_eq!(device.save(), saved);
        assert_eq!(handle.target_pages(), 8);
        assert_eq!(handle.inflated_pages(), 1);
        d.device = device;
        d.handle = handle;
        // The next request on the restored queue is served where the ring left off.
        d.mark(VICTIM_PFN + 1);
        let list = d.pfn_list(&[VICTIM_PFN + 1]);
        d.offer(0, &[desc(list, 4, 0, 0)], 0);
        assert_eq!(d.used_idx(0), 2);
        assert!(!d.marked(VICTIM_PFN + 1), "released");
        assert_eq!(d.handle.inflated_pages(), 2);
        VirtioBalloon::restore(d.mem.clone(), &saved[1..]).unwrap_err();
    }
}
