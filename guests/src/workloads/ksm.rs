//! `mem.ksm`, the guest's part: fill a region with pages that are partly identical across
//! guests (rules in `workloads::ksm`), say so, wait for the host's doorbell while KSM
//! merges, then time the first write to pages that should be merged against pages that
//! cannot be. The host does the rest (settings, sampling, memory figures).

use core::ptr::write_volatile;

use workloads::abi::{DOORBELL_NOT_RUNG, DOORBELL_PORT};
use workloads::ksm::{
    fill_page, identical_pages, is_identical, page_key, PAGE_BYTES, RING_END, RING_MEASURE,
};
use workloads::protocol::Status;
use workloads::table::param::{KSM_IDENTICAL, KSM_SEED, KSM_SIZE};
use workloads::ParamSpec;

use crate::arch::cpu::{inl, rdtsc_fenced};
use crate::mem::arena::{alloc_fresh, alloc_work, work_available, HUGE_PAGE, PAGE};
use crate::sampler::{Refusal, Sampler};

/// Most pages timed in one sample: enough to average out the TSC reads, few enough that
/// small guests still have pages for every sample.
const MAX_BATCH: u64 = 1024;

fn refuse(reason: &'static str) -> Refusal {
    (Status::Error, reason)
}

/// Reads the doorbell until the host rings it. hvbench's VMM holds each read of an unrung
/// doorbell, so this loop exits to the host about ten times a second, not continuously.
fn wait_for_doorbell() -> Result<u32, Refusal> {
    loop {
        match inl(DOORBELL_PORT) {
            DOORBELL_NOT_RUNG => continue,
            u32::MAX => {
                return Err((
                    Status::Skip,
                    "this VMM has no doorbell port: mem.ksm runs under hvbench's KVM VMM",
                ))
            }
            value => return Ok(value),
        }
    }
}

pub fn ksm(s: &Sampler) -> Result<(), Refusal> {
    let number = |spec: &ParamSpec| -> Result<Option<u64>, Refusal> {
        s.param(spec)
            .map(|text| spec.parse_one(text).map_err(|e| refuse(e.message())))
            .transpose()
    };
    let seed = number(&KSM_SEED)?.unwrap_or(0);
    let ppm = number(&KSM_IDENTICAL)?
        .and_then(|v| u32::try_from(v).ok())
        .ok_or(refuse("parameter `identical` has no value"))?;
    // The addresses a sample writes to, gathered before its clock starts; taken from the
    // top of RAM first, so that the region may have everything else.
    let targets = alloc_fresh(MAX_BATCH * 8, PAGE).ok_or(refuse("not enough memory"))?;
    let available = work_available(HUGE_PAGE) & !(PAGE - 1);
    let size = match number(&KSM_SIZE)? {
        None => available,
        Some(v) if v <= available => v,
        Some(_) => return Err(refuse("parameter `size` must fit in the guest's free RAM")),
    };
    let pages = size / PAGE_BYTES;
    let identical = identical_pages(pages, ppm);
    let unique = pages - identical;
    let total = (s.config.warmup + s.config.samples) as u64;
    let batch = (identical.min(unique) / total).min(MAX_BATCH);
    let base = alloc_work(size, HUGE_PAGE).ok_or(refuse("not enough memory for the region"))?;

    for p in 0..pages {
        // SAFETY: page p of the region just allocated (identity-mapped work memory).
        unsafe { fill_page((base + p * PAGE) as *mut u64, page_key(seed, p, ppm)) };
    }
    s.note_hex("pages", pages);
    s.note_hex("identical_pages", identical);
    s.note_hex("ready", pages);

    match wait_for_doorbell()? {
        RING_END => return Ok(()),
        RING_MEASURE => {}
        _ => return Err(refuse("the host rang the doorbell with an unknown value")),
    }
    if batch == 0 {
        return Err(refuse(
            "too few identical or unique pages for one page per sample: raise `size`, or move \
             `identical` away from 0 and 1",
        ));
    }
    // SAFETY: `targets` holds MAX_BATCH >= `batch` words of fresh memory nothing else uses.
    let list = unsafe { core::slice::from_raw_parts_mut(targets as *mut u64, batch as usize) };
    // Merged and unmerged samples alternate, so both see the same host conditions.
    let mut cursors = [0u64; 2];
    for (index, warmup) in s.rounds() {
        for (k, (merged, metric)) in [(true, "write_merged"), (false, "write_unmerged")]
            .into_iter()
            .enumerate()
        {
            let mut n = 0;
            while n < list.len() && cursors[k] < pages {
                let p = cursors[k];
                cursors[k] += 1;
                if is_identical(p, ppm) == merged {
                    list[n] = base + p * PAGE;
                    n += 1;
                }
            }
            let start = rdtsc_fenced();
            for &address in &list[..n] {
                // SAFETY: a page of the region; the first write to it since KSM ran.
                unsafe { write_volatile(address as *mut u64, !0) };
            }
            let cycles = rdtsc_fenced().wrapping_sub(start);
            s.emit_metric_sample(metric, "", index, warmup, n as u64, cycles);
        }
    }
    Ok(())
}
