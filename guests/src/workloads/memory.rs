//! The memory workloads: faults, TLB reach, bandwidth, page-table updates. Buffers come
//! from the arena; 2 MiB mappings are the boot identity map, 4 KiB ones the window.

use core::ptr::write_volatile;

use workloads::memory::{build_chase, chase, copy_bytes, sum_words, CHASE_SEED};
use workloads::params::{ParamSpec, PAGE_4K};
use workloads::protocol::Status;
use workloads::table::param::{
    COPY_SIZE, FIRST_TOUCH_PAGES, PAGE_SIZES, PROT_FAULT_PAGES, SEQ_READ_SIZE, TLB_CHASE_WS,
};

use super::kernel_loop;
use crate::arch::cpu::rdtsc_fenced;
use crate::arch::user::syscall;
use crate::mem::arena::{alloc_fresh, alloc_work, reset_work, HUGE_PAGE, PAGE};
use crate::mem::paging::{self, map_4k, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
use crate::sampler::{Refusal, Sampler};
use crate::sysabi::{KernelOp, PtUpdateArgs, Syscall};

/// Most working sets of one sweep (the row's bound).
const MAX_SERIES: usize = TLB_CHASE_WS.max_items;

fn refuse(reason: &'static str) -> Refusal {
    (Status::Error, reason)
}

/// Writes "key:value" pairs into a small buffer for a sample's series parameters.
pub(super) struct Series {
    buf: [u8; 64],
    len: usize,
}

impl Series {
    pub(super) fn new() -> Self {
        Series {
            buf: [0; 64],
            len: 0,
        }
    }

    pub(super) fn push(mut self, key: &str, value: &str) -> Self {
        for part in [if self.len > 0 { "," } else { "" }, key, ":", value] {
            let n = part.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&part.as_bytes()[..n]);
            self.len += n;
        }
        self
    }

    pub(super) fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// The page sizes a workload is asked for (`page` parameter): whether 4 KiB and 2 MiB
/// mappings are wanted, and the text each series is named by.
fn page_kinds(s: &Sampler) -> Result<[Option<&'static str>; 2], Refusal> {
    let text = s
        .param(&PAGE_SIZES)
        .ok_or(refuse("parameter `page` has no value"))?;
    PAGE_SIZES.check(text).map_err(|e| refuse(e.message()))?;
    let mut want = [None; 2];
    for entry in PAGE_SIZES.entries(text) {
        let four_k = PAGE_SIZES.parse_one(entry) == Ok(PAGE_4K);
        want[usize::from(!four_k)] = Some(entry);
    }
    Ok(want)
}

/// A single-valued parameter, checked against its row (the host checked it too), with
/// the text it was written as (for the series name).
fn value_param(s: &Sampler, spec: &ParamSpec) -> Result<(u64, &'static str), Refusal> {
    let text = s.param(spec).ok_or(refuse("a parameter has no value"))?;
    let value = spec.parse_one(text).map_err(|e| refuse(e.message()))?;
    Ok((value, text))
}

/// Maps `pages` pages at `phys` with the given page size; returns the virtual address.
fn map(phys: u64, pages: u64, four_k: bool) -> Result<u64, Refusal> {
    if four_k {
        map_4k(phys, pages).map(|m| m.va).map_err(refuse)
    } else {
        Ok(phys)
    }
}

/// Fresh pages, first write to each, 4 KiB and 2 MiB guest mappings.
pub fn first_touch(s: &Sampler) -> Result<(), Refusal> {
    let (pages, _) = value_param(s, &FIRST_TOUCH_PAGES)?;
    let want = page_kinds(s)?;
    let bytes = pages * PAGE;
    for (k, four_k) in [true, false].into_iter().enumerate() {
        let Some(name) = want[k] else {
            continue;
        };
        let series = Series::new().push(PAGE_SIZES.key, name);
        for (index, warmup) in s.rounds() {
            let phys = alloc_fresh(bytes, HUGE_PAGE).ok_or(refuse(
                "not enough untouched memory left: give the guest more (--memory-mib)",
            ))?;
            let va = map(phys, pages, four_k)?;
            let (cycles, marker) = s.mark(|| {
                let start = rdtsc_fenced();
                for p in 0..pages {
                    // SAFETY: the page belongs to the fresh range just mapped.
                    unsafe { write_volatile((va + p * PAGE) as *mut u64, p) };
                }
                rdtsc_fenced().wrapping_sub(start)
            });
            s.emit_marked_sample(series.as_str(), (index, warmup), pages, cycles, marker);
            paging::unmap();
            reset_work();
        }
    }
    Ok(())
}

/// Writes to read-only pages; the kernel's #PF handler makes each writable again.
pub fn prot_fault(s: &Sampler) -> Result<(), Refusal> {
    let (pages, _) = value_param(s, &PROT_FAULT_PAGES)?;
    let phys = alloc_work(pages * PAGE, PAGE).ok_or(refuse("not enough memory for the pages"))?;
    let mapping = map_4k(phys, pages).map_err(refuse)?;
    syscall(
        Syscall::SetProtWindow as u64,
        mapping.va,
        pages,
        mapping.first_pt,
    );
    let mut result = Ok(());
    for (index, warmup) in s.rounds() {
        for p in 0..pages {
            // SAFETY: the window's PTE for page p; clearing RW makes the next write fault.
            unsafe {
                let pte = mapping.pte(p);
                pte.write_volatile(pte.read_volatile() & !PTE_WRITABLE);
            }
        }
        paging::flush_tlb();
        let (cycles, marker) = s.mark(|| {
            let start = rdtsc_fenced();
            for p in 0..pages {
                // SAFETY: a page of the window; the fault it takes is repaired by the kernel.
                unsafe { write_volatile((mapping.va + p * PAGE) as *mut u64, p) };
            }
            rdtsc_fenced().wrapping_sub(start)
        });
        // Every page must have been repaired, or the handler did not run.
        for p in 0..pages {
            // SAFETY: as above.
            if unsafe { mapping.pte(p).read_volatile() } & PTE_WRITABLE == 0 {
                result = Err((
                    Status::Failure,
                    "a write to a read-only page completed without a fault",
                ));
            }
        }
        s.emit_marked_sample("", (index, warmup), pages, cycles, marker);
    }
    syscall(Syscall::SetProtWindow as u64, 0, 0, 0);
    result
}

/// Random pointer chase, one element per page, over a sweep of working sets.
pub fn tlb_chase(s: &Sampler) -> Result<(), Refusal> {
    let want = page_kinds(s)?;
    let ws_text = s
        .param(&TLB_CHASE_WS)
        .ok_or(refuse("parameter `ws` has no value"))?;
    let count = TLB_CHASE_WS
        .check(ws_text)
        .map_err(|e| refuse(e.message()))?;
    let mut sizes = [0u64; MAX_SERIES];
    for (size, entry) in sizes.iter_mut().zip(TLB_CHASE_WS.entries(ws_text)) {
        *size = TLB_CHASE_WS
            .parse_one(entry)
            .map_err(|e| refuse(e.message()))?;
    }
    let largest = sizes[..count].iter().copied().max().unwrap_or(PAGE);
    let phys = alloc_work(largest, HUGE_PAGE)
        .ok_or(refuse("not enough memory for the largest working set"))?;
    for (k, four_k) in [true, false].into_iter().enumerate() {
        let Some(name) = want[k] else {
            continue;
        };
        for (ws, text) in sizes[..count].iter().zip(TLB_CHASE_WS.entries(ws_text)) {
            let pages = ws / PAGE;
            let va = map(phys, pages, four_k)?;
            // SAFETY: [va, va + ws) is mapped to the buffer allocated above.
            let start = unsafe { build_chase(va as *mut u8, pages as usize, CHASE_SEED) };
            let series = Series::new()
                .push(TLB_CHASE_WS.key, text)
                .push(PAGE_SIZES.key, name);
            let mut p = start;
            s.latency(series.as_str(), |n| {
                let t0 = rdtsc_fenced();
                // SAFETY: `p` is an element of the chain just built.
                p = unsafe { chase(p, n) };
                Ok(rdtsc_fenced().wrapping_sub(t0))
            })?;
            core::hint::black_box(p);
            if four_k {
                paging::unmap();
            }
        }
    }
    Ok(())
}

/// Sequential read bandwidth.
pub fn seq_read(s: &Sampler) -> Result<(), Refusal> {
    let (size, size_text) = value_param(s, &SEQ_READ_SIZE)?;
    let buf = alloc_work(size, HUGE_PAGE).ok_or(refuse("not enough memory for the buffer"))?;
    // Touch it once: the workload measures reads, not first touches.
    // SAFETY: `buf` is `size` bytes of work memory, identity-mapped.
    unsafe { core::ptr::write_bytes(buf as *mut u8, 1, crate::convert::usize_from(size)) };
    let series = Series::new().push(SEQ_READ_SIZE.key, size_text);
    s.measure(series.as_str(), |n| {
        let t0 = rdtsc_fenced();
        for _ in 0..n {
            // SAFETY: as above.
            core::hint::black_box(unsafe {
                sum_words(buf as *const u64, crate::convert::usize_from(size))
            });
        }
        Ok((n * size, rdtsc_fenced().wrapping_sub(t0)))
    })?;
    Ok(())
}

/// Copy bandwidth.
pub fn copy(s: &Sampler) -> Result<(), Refusal> {
    let (size, size_text) = value_param(s, &COPY_SIZE)?;
    let src = alloc_work(size, HUGE_PAGE).ok_or(refuse("not enough memory for the buffers"))?;
    let dst = alloc_work(size, HUGE_PAGE).ok_or(refuse("not enough memory for the buffers"))?;
    // SAFETY: both are `size` bytes of work memory.
    unsafe {
        core::ptr::write_bytes(src as *mut u8, 1, crate::convert::usize_from(size));
        core::ptr::write_bytes(dst as *mut u8, 2, crate::convert::usize_from(size));
    }
    let series = Series::new().push(COPY_SIZE.key, size_text);
    s.measure(series.as_str(), |n| {
        let t0 = rdtsc_fenced();
        for _ in 0..n {
            // SAFETY: disjoint buffers of `size` bytes.
            unsafe {
                copy_bytes(
                    dst as *mut u8,
                    src as *const u8,
                    crate::convert::usize_from(size),
                )
            };
        }
        Ok((n * size, rdtsc_fenced().wrapping_sub(t0)))
    })?;
    Ok(())
}

/// A PTE rewritten, invalidated and used, in a kernel loop.
pub fn pt_update(s: &Sampler) -> Result<(), Refusal> {
    let pages = alloc_work(2 * PAGE, PAGE).ok_or(refuse("not enough memory"))?;
    let mapping = map_4k(pages, 1).map_err(refuse)?;
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    let args = PtUpdateArgs {
        pte: mapping.pte(0) as u64,
        va: mapping.va,
        entries: [pages | flags, (pages + PAGE) | flags],
    };
    s.latency("", |n| {
        kernel_loop(KernelOp::PtUpdate, n, &args as *const _ as u64)
    })?;
    Ok(())
}
