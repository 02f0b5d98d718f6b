//! A virtio-blk device (device ID 2) on the virtio-mmio transport, version 2, backed by a
//! file or a block device ([`DiskConfig`]): read, write, flush and get-id, one request
//! queue of up to 256 entries, as many requests in flight as the driver queues.
//!
//! The device is served off the vCPU thread: the queue's notification register is a KVM
//! ioeventfd, so the guest's notify never leaves the kernel, and an I/O thread waits on
//! it, takes every request the driver made available, checks each whole
//! ([`request::parse`]), runs it on the disk (preadv/pwritev straight into guest RAM,
//! fdatasync for flush) and puts it on the used ring. There is no interrupt controller:
//! the driver polls the used ring (the records say so). The requests of one notification
//! are served one after another by that thread.
//!
//! The guest is untrusted. A request that fails a check (wrong direction, a buffer outside
//! guest RAM, sectors past the disk, a ragged length, an unknown type) gets
//! VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP in its status byte and the device goes on; a
//! chain with no usable status byte, or a queue that cannot be read, makes the device set
//! DEVICE_NEEDS_RESET and serve nothing until the driver resets it. Each refusal is kept
//! for the host ([`BlkHandle::refusals`]).

mod disk;
mod request;
mod uring;

use std::num::Wrapping;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::disk::Disk;
pub use self::disk::DiskConfig;
use self::request::{Refused, RequestError};
use super::balloon::Refusals;
use super::virtio_mmio::{self, Effect, Transport};
use workloads::virtio_blk::{
    CONFIG_BLK_SIZE, CONFIG_CAPACITY, CONFIG_LEN, CONFIG_SEG_MAX, CONFIG_SIZE_MAX, DEVICE_ID_BLOCK,
    F_BLK_SIZE, F_FLUSH, F_SEG_MAX, F_SIZE_MAX, MAX_REQUEST_BYTES, QUEUE_REQUEST, SEG_MAX,
};

use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// Refusals kept word for word; later ones are only counted.
const MAX_REFUSALS_KEPT: usize = 16;
/// The block size the device reports (`blk_size`).
const BLOCK_SIZE: u32 = 4096;
/// The features offered (word 0; the transport adds VERSION_1).
const FEATURES: u32 = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;

/// The configuration space: capacity, size_max, seg_max, blk_size.
fn config(capacity: u64) -> [u8; u64_to_usize(CONFIG_LEN)] {
    let mut c = [0u8; u64_to_usize(CONFIG_LEN)];
    let at = |o: u64| u64_to_usize(o);
    c[at(CONFIG_CAPACITY)..][..8].copy_from_slice(&capacity.to_le_bytes());
    c[at(CONFIG_SIZE_MAX)..][..4].copy_from_slice(&MAX_REQUEST_BYTES.to_le_bytes());
    c[at(CONFIG_SEG_MAX)..][..4].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[at(CONFIG_BLK_SIZE)..][..4].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    c
}
/// How long the I/O thread waits for a notification before it looks at its stop flag.
const WAIT_MS: libc::c_int = 200;

/// What the device, its I/O thread and the host's handle share.
#[derive(Debug, Default)]
struct Shared {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    /// The I/O thread hands requests to io_uring (else it runs them one by one).
    io_uring: AtomicBool,
    /// Requests answered with IOERR or UNSUPP, and refusals that reset the device.
    refusals: Mutex<Refusals>,
}

impl Shared {
    /// Counts a request that succeeded.
    fn count(&self, req: &request::Request) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        let _ = match req.kind {
            request::Kind::Read => self.bytes_read.fetch_add(req.data_len, Ordering::AcqRel),
            request::Kind::Write => self.bytes_written.fetch_add(req.data_len, Ordering::AcqRel),
            request::Kind::Flush => self.flushes.fetch_add(1, Ordering::AcqRel),
            request::Kind::GetId => 0,
        };
    }

    fn refuse(&self, why: String) {
        // The log is whole after any panic of a holder: a push and a count.
        let mut log = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        log.total += 1;
        if log.kept.len() < MAX_REFUSALS_KEPT {
            log.kept.push(why);
        }
    }
}

/// The host's view of the device: what it served and what it refused.
#[derive(Clone, Debug)]
pub struct BlkHandle {
    shared: Arc<Shared>,
}

impl BlkHandle {
    pub fn refusals(&self) -> Refusals {
        self.shared
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests completed successfully.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Acquire)
    }

    pub fn bytes_read(&self) -> u64 {
        self.shared.bytes_read.load(Ordering::Acquire)
    }

    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes_written.load(Ordering::Acquire)
    }

    pub fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Acquire)
    }

    /// Whether the I/O thread serves requests through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.shared.io_uring.load(Ordering::Acquire)
    }
}

/// The device's state, shared by the vCPU thread (registers) and the I/O thread (queue).
#[derive(Debug)]
pub(crate) struct State {
    memory: GuestMemory,
    disk: Disk,
    shared: Arc<Shared>,
    transport: Transport,
    /// Sectors of the disk (the configuration space's capacity).
    capacity: u64,
    queue: Queue,
    /// Set by the device on a request it cannot answer; cleared by a reset.
    needs_reset: bool,
    /// Resets so far: a request in flight across a reset is not completed.
    generation: u64,
    /// A migration paused the device: it takes no request until resumed.
    paused: bool,
    /// Requests handed to io_uring and not yet completed.
    in_flight: u32,
}

impl State {
    /// Takes every request the driver made available: each well-formed one goes to
    /// `out`, each refused one is answered (its status byte, the used ring) at once. An
    /// error here is one the device cannot answer: it then needs a reset.
    fn take(&mut self, out: &mut Vec<(u16, request::Request)>) -> Result<(), RequestError> {
        if self.paused || self.needs_reset || !self.transport.driver_ok() || !self.queue.ready() {
            return Ok(());
        }
        let mem = &self.memory;
        let broken = RequestError::BrokenChain { head: 0 };
        if !self.queue.is_valid(mem) {
            return Err(broken);
        }
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| broken.clone())?;
        let moved = (avail - Wrapping(self.queue.next_avail())).0;
        if moved > self.queue.size() {
            return Err(broken);
        }
        for _ in 0..moved {
            let chain = self
                .queue
                .pop_descriptor_chain(mem)
                .ok_or_else(|| broken.clone())?;
            let head = chain.head_index();
            match request::parse(mem, chain, self.disk.capacity_sectors()) {
                Ok(req) => out.push((head, req)),
                Err(Refused {
                    error,
                    status: Some(status),
                }) => {
                    self.shared.refuse(error.to_string());
                    mem.write_obj(error.status(), status)
                        .map_err(|_| RequestError::NoStatus { head })?;
                    self.queue
                        .add_used(mem, head, 1)
                        .map_err(|_| RequestError::BrokenChain { head })?;
                }
                Err(Refused {
                    error,
                    status: None,
                }) => return Err(error),
            }
        }
        Ok(())
    }

    /// Puts a finished request on the used ring (`written` bytes into its buffers).
    fn finish(&mut self, head: u16, written: u32) {
        if self.queue.add_used(&self.memory, head, written).is_err() {
            self.needs_reset = true;
            self.shared
                .refuse(RequestError::BrokenChain { head }.to_string());
        }
    }

    /// One synchronous pass: every request taken is run on the disk in turn.
    fn serve_sync(&mut self) {
        let mut batch = Vec::new();
        if let Err(refusal) = self.take(&mut batch) {
            self.needs_reset = true;
            self.shared.refuse(refusal.to_string());
        }
        for (head, req) in batch {
            let written = complete(&mut self.disk, &self.memory, &self.shared, &req);
            self.finish(head, written);
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap_or([0; 4]))
}

/// The state [`VirtioBlk::pause`] returns.
fn save(state: &State, path: &Path) -> Vec<u8> {
    let path = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(128 + path.len());
    out.extend(state.transport.encode());
    out.extend(virtio_mmio::encode_queue(&state.queue));
    out.extend(u32::from(state.needs_reset).to_le_bytes());
    out.extend(state.capacity.to_le_bytes());
    out.extend(u32::try_from(path.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend(path);
    out
}

/// Runs a checked request and writes its status; the bytes written into guest buffers.
fn complete(disk: &mut Disk, mem: &GuestMemory, shared: &Shared, req: &request::Request) -> u32 {
    let (status, written) = match disk.execute(mem, req) {
        Ok(written) => {
            shared.requests.fetch_add(1, Ordering::AcqRel);
            let _ = match req.kind {
                request::Kind::Read => shared.bytes_read.fetch_add(req.data_len, Ordering::AcqRel),
                request::Kind::Write => shared
                    .bytes_written
                    .fetch_add(req.data_len, Ordering::AcqRel),
                request::Kind::Flush => shared.flushes.fetch_add(1, Ordering::AcqRel),
                request::Kind::GetId => 0,
            };
            (workloads::virtio_blk::S_OK, written)
        }
        Err(e) => {
            shared.refuse(e.to_string());
            (workloads::virtio_blk::S_IOERR, 0)
        }
    };
    // The status byte was checked to be guest RAM; a failure here cannot happen short of
    // the RAM going away, and then nobody reads it.
    let _ = mem.write_obj(status, req.status);
    written.saturating_add(1)
}

/// Locks the state; a panic of a holder cannot leave it half-written in a way that
/// matters more than refusing the next request, so a poisoned lock is taken as is.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device as the vCPU thread holds it: its registers go through the shared state; its
/// I/O thread runs until the device is dropped.
#[derive(Debug)]
pub(crate) struct VirtioBlk {
    state: Arc<Mutex<State>>,
    /// The disk's path, which a migration names to the destination.
    path: std::path::PathBuf,
    notify: EventFd,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("opening the disk {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("creating the virtio-blk queue: {0}")]
    Queue(virtio_queue::Error),
    #[error("creating the notification eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("starting the virtio-blk I/O thread: {0}")]
    Thread(std::io::Error),
}

impl VirtioBlk {
    /// A device over `memory` and the disk `config` names, its I/O thread started.
    pub(crate) fn new(
        memory: GuestMemory,
        config: &DiskConfig,
        name: &str,
    ) -> Result<(Self, BlkHandle), BlkError> {
        let disk = Disk::open(config).map_err(|source| BlkError::Open {
            path: config.path.display().to_string(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let capacity = disk.capacity_sectors();
        let state = Arc::new(Mutex::new(State {
            memory,
            disk,
            shared: shared.clone(),
            transport: Transport::new(DEVICE_ID_BLOCK, FEATURES),
            capacity,
            queue: Queue::new(workloads::virtio::QUEUE_SIZE_MAX).map_err(BlkError::Queue)?,
            needs_reset: false,
            generation: 0,
            paused: false,
            in_flight: 0,
        }));
        let notify = EventFd::new(EFD_NONBLOCK).map_err(BlkError::EventFd)?;
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (state, stop) = (state.clone(), stop.clone());
            let event = notify.try_clone().map_err(BlkError::EventFd)?;
            std::thread::Builder::new()
                .name(format!("blk-{name}"))
                .spawn(move || io_thread(&state, &event, &stop))
                .map_err(BlkError::Thread)?
        };
        let device = VirtioBlk {
            state,
            path: config.path.clone(),
            notify,
            stop,
            worker: Some(worker),
        };
        Ok((device, BlkHandle { shared }))
    }

    /// Pauses the device for a migration: it takes no more requests, and every request
    /// in flight completes (within `limit`, else it runs on and says why). Returns its
    /// state: the transport, the queue, whether it needs a reset, the disk's capacity
    /// and path (the destination opens the same file).
    pub(crate) fn pause(&self, limit: Duration) -> Result<Vec<u8>, String> {
        lock(&self.state).paused = true;
        let started = Instant::now();
        loop {
            let state = lock(&self.state);
            if state.in_flight == 0 {
                return Ok(save(&state, &self.path));
            }
            drop(state);
            if started.elapsed() > limit {
                self.resume();
                return Err(format!(
                    "the virtio-blk's requests did not complete within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Serves requests again after [`VirtioBlk::pause`] (the migration failed), or at
    /// the destination once the guest runs there; looks at the queue at once, for the
    /// requests made available meanwhile.
    pub(crate) fn resume(&self) {
        lock(&self.state).paused = false;
        let _ = self.notify.write(1);
    }

    /// A device over `memory` and `config`'s disk as [`VirtioBlk::pause`] left it at the
    /// source: the disk must be the same path and capacity.
    pub(crate) fn restore(
        memory: GuestMemory,
        config: &DiskConfig,
        name: &str,
        saved: &[u8],
    ) -> Result<(Self, BlkHandle), String> {
        let (t, q) = (virtio_mmio::TRANSPORT_BYTES, virtio_mmio::QUEUE_BYTES);
        let fixed = t + q + 4 + 8 + 4;
        if saved.len() < fixed {
            return Err(format!("virtio-blk state of {} bytes", saved.len()));
        }
        let (words, path) = saved.split_at(fixed);
        let needs_reset = le32(&words[t + q..]) != 0;
        let capacity =
            u64::from_le_bytes(words[t + q + 4..t + q + 12].try_into().unwrap_or([0; 8]));
        let path_len = usize::try_from(le32(&words[t + q + 12..])).unwrap_or(usize::MAX);
        if path_len != path.len() || path != config.path.as_os_str().as_bytes() {
            return Err(format!(
                "the guest's disk was {:?} at the source; this destination has {}",
                String::from_utf8_lossy(&path[..path.len().min(256)]),
                config.path.display()
            ));
        }
        let (device, handle) = VirtioBlk::new(memory, config, name).map_err(|e| e.to_string())?;
        {
            let mut state = lock(&device.state);
            if state.capacity != capacity {
                return Err(format!(
                    "the disk has {} sectors here, {capacity} at the source",
                    state.capacity
                ));
            }
            state.transport = Transport::decode(DEVICE_ID_BLOCK, FEATURES, &words[..t])?;
            state.queue =
                virtio_mmio::decode_queue(&words[t..t + q], workloads::virtio::QUEUE_SIZE_MAX)?;
            state.needs_reset = needs_reset;
            // Paused until the guest runs here (`resume` after the source's Go): the disk
            // is the source's too, and it may yet run the guest on.
            state.paused = true;
        }
        Ok((device, handle))
    }

    /// The eventfd KVM signals on a write to the queue-notify register.
    pub(crate) fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    pub(crate) fn read(&mut self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.state);
        if offset >= workloads::virtio::REG_CONFIG {
            virtio_mmio::read_config(&config(state.capacity), offset, data);
            return;
        }
        let queues = std::slice::from_ref(&state.queue);
        state
            .transport
            .read(offset, data, queues, state.needs_reset, 0);
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let queues = std::slice::from_mut(&mut state.queue);
        match state.transport.write(offset, data, queues) {
            Effect::Reset => {
                state.needs_reset = false;
                state.generation += 1;
            }
            // A notify that reached userspace (no ioeventfd): hand it to the I/O thread.
            Effect::Notify(QUEUE_REQUEST) => {
                let _ = self.notify.write(1);
            }
            Effect::None | Effect::Notify(_) => {}
        }
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.notify.write(1);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Serves the queue until `stop`: through io_uring where the kernel has it, else one
/// request after another with preadv/pwritev.
fn io_thread(state: &Mutex<State>, event: &EventFd, stop: &AtomicBool) {
    match uring::Uring::new() {
        Ok(mut ring) => {
            lock(state).shared.io_uring.store(true, Ordering::Release);
            ring.run(state, event, stop);
        }
        Err(_) => sync_thread(state, event, stop),
    }
}

fn sync_thread(state: &Mutex<State>, event: &EventFd, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let mut fds = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(event),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours, for the length of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, WAIT_MS) };
        if ready <= 0 {
            continue;
        }
        // Resets the counter; every notification until now is covered by this pass.
        let _ = event.read();
        lock(state).serve_sync();
    }
}

#[cfg(test)]
mod tests;
