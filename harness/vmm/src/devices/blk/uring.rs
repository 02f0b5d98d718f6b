//! The I/O thread's engine where the kernel has io_uring: every request the driver made
//! available goes to the kernel at once (readv/writev on the disk, straight into guest
//! RAM, or fsync with DATASYNC), so as many requests are in flight on the host as the
//! guest keeps in its queue; completions are put on the used ring as they come. The
//! notification eventfd is polled through the same ring, so one wait covers both.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use workloads::virtio_blk::{S_IOERR, S_OK};

use super::request::{Kind, Request};
use super::{lock, State};

/// Ring entries: the queue's 256 entries can hold at most 128 requests (two descriptors
/// or more each), plus the poll of the notification eventfd.
const ENTRIES: u32 = 256;
/// The poll's tag; requests are tagged by their slot.
const POLL: u64 = u64::MAX;
const ALIGN: usize = 4096;

/// One request the kernel is working on.
struct Pending {
    head: u16,
    request: Request,
    /// The device's reset count when it was sent: a completion after a reset is dropped.
    generation: u64,
    /// The iovecs the kernel reads (kept alive until the completion).
    _iovecs: Vec<libc::iovec>,
    /// An aligned copy for O_DIRECT requests with unaligned guest buffers: the buffer and
    /// where its aligned part starts.
    bounce: Option<Bounce>,
}

/// A bounce buffer and where its 4 KiB-aligned part starts.
type Bounce = (Vec<u8>, usize);

pub(crate) struct Uring {
    ring: IoUring,
    pending: Vec<Option<Pending>>,
}

impl Uring {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Uring {
            ring: IoUring::new(ENTRIES)?,
            pending: (0..ENTRIES).map(|_| None).collect(),
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> bool {
        // SAFETY: every buffer an entry names (iovecs, guest RAM, bounce buffers) is kept
        // alive until its completion: in `pending`, and guest RAM by the state's mapping,
        // which outlives the thread's wait for every pending completion.
        unsafe { self.ring.submission().push(&entry).is_ok() }
    }

    fn arm_poll(&mut self, event: &EventFd) {
        let poll = opcode::PollAdd::new(types::Fd(event.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(POLL);
        let _ = self.push(poll);
    }

    fn busy(&self) -> bool {
        self.pending.iter().any(Option::is_some)
    }

    /// Serves the device until `stop`, then waits for what is still in flight.
    pub(crate) fn run(&mut self, state: &Mutex<State>, event: &EventFd, stop: &AtomicBool) {
        self.arm_poll(event);
        let mut batch = Vec::new();
        loop {
            if stop.load(Ordering::Acquire) && !self.busy() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    lock(state).shared.refuse(format!("io_uring failed: {e}"));
                    return;
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (tag, result) in done {
                if tag == POLL {
                    let _ = event.read();
                    if !stop.load(Ordering::Acquire) {
                        self.take_requests(state, &mut batch);
                        self.arm_poll(event);
                    }
                } else {
                    self.complete(state, tag, result);
                }
            }
        }
    }

    /// Takes every request made available and hands it to the kernel.
    fn take_requests(&mut self, state: &Mutex<State>, batch: &mut Vec<(u16, Request)>) {
        let mut guard = lock(state);
        let state = &mut *guard;
        batch.clear();
        if let Err(refusal) = state.take(batch) {
            state.needs_reset = true;
            state.shared.refuse(refusal.to_string());
        }
        for (head, request) in batch.drain(..) {
            if request.kind == Kind::GetId {
                let written =
                    super::complete(&mut state.disk, &state.memory, &state.shared, &request);
                state.finish(head, written);
                continue;
            }
            if let Err(why) = self
                .submit(state, head, request.clone())
                .map(|()| state.in_flight += 1)
            {
                state.shared.refuse(why);
                let _ = state.memory.write_obj(S_IOERR, request.status);
                state.finish(head, 1);
            }
        }
    }

    fn submit(&mut self, state: &State, head: u16, request: Request) -> Result<(), String> {
        let slot = self
            .pending
            .iter()
            .position(Option::is_none)
            .ok_or("more requests in flight than the ring holds")?;
        let fd = types::Fd(state.disk.raw_fd());
        let mut pending = Pending {
            head,
            generation: state.generation,
            _iovecs: Vec::new(),
            bounce: None,
            request,
        };
        let req = &pending.request;
        let entry = match req.kind {
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Read | Kind::Write => {
                let write = req.kind == Kind::Write;
                let iovecs = if state.disk.aligned(req) {
                    guest_iovecs(&state.memory, req)?
                } else {
                    let (iov, bounce) = bounce_iovec(&state.memory, req, write)?;
                    pending.bounce = Some(bounce);
                    iov
                };
                let count = u32::try_from(iovecs.len()).map_err(|e| e.to_string())?;
                let entry = if write {
                    opcode::Writev::new(fd, iovecs.as_ptr(), count)
                        .offset(req.offset)
                        .build()
                } else {
                    opcode::Readv::new(fd, iovecs.as_ptr(), count)
                        .offset(req.offset)
                        .build()
                };
                pending._iovecs = iovecs;
                entry
            }
            Kind::GetId => return Err("get-id goes through the synchronous path".into()),
        };
        if !self.push(entry.user_data(slot as u64)) {
            return Err("the io_uring submission queue is full".into());
        }
        self.pending[slot] = Some(pending);
        Ok(())
    }

    fn complete(&mut self, state: &Mutex<State>, tag: u64, result: i32) {
        let Some(pending) = usize::try_from(tag)
            .ok()
            .and_then(|slot| self.pending.get_mut(slot))
            .and_then(Option::take)
        else {
            return;
        };
        let mut state = lock(state);
        state.in_flight = state.in_flight.saturating_sub(1);
        if pending.request.kind == Kind::Read && pending.bounce.is_none() {
            super::disk::mark_read(&state.memory, &pending.request);
        }
        if pending.generation != state.generation {
            return;
        }
        let req = &pending.request;
        let expected = if req.kind == Kind::Flush {
            0
        } else {
            req.data_len
        };
        let moved = u64::try_from(result).ok();
        let mut ok = moved == Some(expected);
        if ok && req.kind == Kind::Read {
            if let Some((buf, start)) = &pending.bounce {
                let len = crate::cast::u64_to_usize(req.data_len);
                ok = scatter(&state.memory, req, &buf[*start..*start + len]);
            }
        }
        if ok {
            state.shared.count(req);
        } else {
            state.shared.refuse(format!(
                "{:?} of {} bytes at byte {} of the disk: {}",
                req.kind,
                req.data_len,
                req.offset,
                if result < 0 {
                    std::io::Error::from_raw_os_error(-result).to_string()
                } else {
                    format!("moved only {result} bytes")
                }
            ));
        }
        let _ = state
            .memory
            .write_obj(if ok { S_OK } else { S_IOERR }, req.status);
        let written = if ok && req.kind == Kind::Read {
            u32::try_from(req.data_len).unwrap_or(0)
        } else {
            0
        };
        state.finish(pending.head, written.saturating_add(1));
    }
}

/// iovecs over the request's guest buffers (each checked to be guest RAM).
fn guest_iovecs(mem: &super::GuestMemory, req: &Request) -> Result<Vec<libc::iovec>, String> {
    req.data
        .iter()
        .map(|s| {
            let slice = mem
                .get_slice(s.addr, s.len as usize)
                .map_err(|e| format!("a buffer at {:#x}: {e}", s.addr.0))?;
            Ok(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len as usize,
            })
        })
        .collect()
}

/// One iovec over an aligned bounce buffer (filled from guest RAM for a write).
fn bounce_iovec(
    mem: &super::GuestMemory,
    req: &Request,
    write: bool,
) -> Result<(Vec<libc::iovec>, Bounce), String> {
    let len = crate::cast::u64_to_usize(req.data_len);
    let mut buf = vec![0u8; len + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    if write {
        let mut at = start;
        for s in &req.data {
            let n = s.len as usize;
            mem.read_slice(&mut buf[at..at + n], s.addr)
                .map_err(|e| format!("a buffer at {:#x}: {e}", s.addr.0))?;
            at += n;
        }
    }
    let iov = libc::iovec {
        iov_base: buf[start..].as_mut_ptr().cast(),
        iov_len: len,
    };
    // The Vec's heap buffer does not move when the Vec itself is moved into `pending`.
    Ok((vec![iov], (buf, start)))
}

fn scatter(mem: &super::GuestMemory, req: &Request, data: &[u8]) -> bool {
    let mut at = 0;
    for s in &req.data {
        let n = s.len as usize;
        if mem.write_slice(&data[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}
