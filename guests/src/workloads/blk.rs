//! The block workloads (`io.blk-*`) and `selftest.blk-corrupt`, over the one request
//! interface ([`crate::blk::BlockDevice`]).
//!
//! One sample keeps `qd` requests of `bs` bytes in flight until `n` have completed (n
//! doubles until a sample lasts `--sample-us`): each completion found by polling is
//! replaced at once, the replacements of one poll pass share one notification. A sample
//! reports its IOPS and MB/s (requests and bytes over the sample's cycles) and the
//! percentiles of its requests' completion latencies (submission to the driver seeing
//! the used buffer) from a log-bucket histogram. Writes carry a pattern derived from each
//! sector's offset; afterwards the guest reads the region back and checks that every block
//! it wrote holds its pattern and every other block is untouched (zero) or a pattern.

use core::ptr::read_volatile;

use workloads::blk::{classify, fill, stamp, BlockContent, Histogram, Rng, STAMP_UNIT};
use workloads::protocol::Status;
use workloads::table::param::{
    BLK_BS_RANDOM, BLK_BS_SEQUENTIAL, BLK_DURATION_MS, BLK_QD_RANDOM, BLK_QD_SEQUENTIAL,
    BLK_RANDOM, BLK_REGION, BLK_SEQUENTIAL,
};
use workloads::virtio::{DESC_F_NEXT, DESC_F_WRITE};
use workloads::virtio_blk::{HEADER_LEN, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT};
use workloads::{ParamSpec, WorkloadId};

use crate::arch::cpu::rdtsc_fenced;
use crate::blk::virtio::{VirtioBlk, STATUS_PENDING};
use crate::blk::{self, BlockDevice, Device, Op};
use crate::convert::usize_from;
use crate::mem::arena::{alloc_work, PAGE};
use crate::sampler::{Refusal, Sampler};
use crate::virtio::Descriptor;

/// Most series values of one list parameter (the rows' bound).
const MAX_ITEMS: usize = 4;
/// A page's size as a request length.
const PAGE_U32: u32 = 4096;
/// Fewest requests per sample, so its latency percentiles rest on more than a handful.
const MIN_REQUESTS: u64 = 32;
/// Most requests one sample may take, so a pathological host cannot make it endless.
const MAX_REQUESTS: u64 = 1 << 24;
/// Empty polls before the driver looks at the device's status register (an exit).
const POLLS_PER_STATUS: u32 = 1 << 16;
/// Empty polls before a request counts as lost.
const MAX_EMPTY_POLLS: u64 = 1 << 33;
/// Most blocks whose writing is tracked for the read-back check (a 1 MiB bitmap).
const MAX_TRACKED_BLOCKS: u64 = 8 << 20;

fn error(reason: &'static str) -> Refusal {
    (Status::Error, reason)
}

/// The access pattern of one series.
#[derive(Clone, Copy)]
struct Plan {
    op: Op,
    bs: u64,
    qd: u16,
    region: u64,
    /// Parts per million of requests at a random block.
    random_ppm: u64,
}

/// Where the requests go, and which blocks were written.
struct Cursor {
    rng: Rng,
    next_seq: u64,
    /// One bit per `bs` block of the region, where it fits.
    written: Option<u64>,
}

impl Cursor {
    fn next(&mut self, plan: &Plan) -> u64 {
        let blocks = plan.region / plan.bs;
        let block = if self.rng.below(1_000_000) < plan.random_ppm {
            self.rng.below(blocks)
        } else {
            let b = self.next_seq % blocks;
            self.next_seq = b + 1;
            b
        };
        if let (Op::Write, Some(bitmap)) = (plan.op, self.written) {
            // SAFETY: the bitmap holds one bit per block (allocated for `blocks`).
            unsafe {
                let byte = (bitmap + block / 8) as *mut u8;
                *byte |= 1 << (block % 8);
            }
        }
        block * plan.bs
    }
}

fn list(
    s: &Sampler,
    spec: &ParamSpec,
) -> Result<([u64; MAX_ITEMS], [&'static str; MAX_ITEMS], usize), Refusal> {
    let text = s
        .param(spec)
        .ok_or(error("a block parameter has no value"))?;
    let count = spec
        .check(text)
        .map_err(|e| error(e.message()))?
        .min(MAX_ITEMS);
    let mut values = [0u64; MAX_ITEMS];
    let mut texts = [""; MAX_ITEMS];
    for (i, entry) in spec.entries(text).take(count).enumerate() {
        values[i] = spec.parse_one(entry).map_err(|e| error(e.message()))?;
        texts[i] = entry;
    }
    Ok((values, texts, count))
}

/// Cycles one sample lasts at least: `duration_ms` where given, else `--sample-us`.
fn sample_cycles(s: &Sampler) -> u64 {
    let Some(ms) = s
        .param(&BLK_DURATION_MS)
        .and_then(|t| BLK_DURATION_MS.parse_one(t).ok())
    else {
        return s.min_cycles;
    };
    // The TSC rate the sampler was sized with: min_cycles per --sample-us microseconds.
    let per_us = s.min_cycles / (s.config.sample_us as u64).max(1);
    per_us.saturating_mul(ms).saturating_mul(1000)
}

fn one(s: &Sampler, spec: &ParamSpec) -> Result<u64, Refusal> {
    let text = s
        .param(spec)
        .ok_or(error("a block parameter has no value"))?;
    spec.parse_one(text).map_err(|e| error(e.message()))
}

/// A buffer of `bytes` from the arena, as a slice.
fn buffer(bytes: u64) -> Result<&'static mut [u8], Refusal> {
    let at =
        alloc_work(bytes, PAGE).ok_or(error("not enough guest memory for the block buffers"))?;
    // SAFETY: `bytes` of identity-mapped work memory this workload alone uses until it ends.
    Ok(unsafe { core::slice::from_raw_parts_mut(at as *mut u8, usize_from(bytes)) })
}

/// `io.blk-randread`, `-randwrite`, `-seqread`, `-seqwrite`.
pub fn transfer(s: &Sampler) -> Result<(), Refusal> {
    let (op, bs_spec, qd_spec, random_spec) = match s.workload {
        WorkloadId::IoBlkRandread => (Op::Read, BLK_BS_RANDOM, BLK_QD_RANDOM, BLK_RANDOM),
        WorkloadId::IoBlkRandwrite => (Op::Write, BLK_BS_RANDOM, BLK_QD_RANDOM, BLK_RANDOM),
        WorkloadId::IoBlkSeqread => (
            Op::Read,
            BLK_BS_SEQUENTIAL,
            BLK_QD_SEQUENTIAL,
            BLK_SEQUENTIAL,
        ),
        _ => (
            Op::Write,
            BLK_BS_SEQUENTIAL,
            BLK_QD_SEQUENTIAL,
            BLK_SEQUENTIAL,
        ),
    };
    let (sizes, size_texts, n_sizes) = list(s, &bs_spec)?;
    let (depths, depth_texts, n_depths) = list(s, &qd_spec)?;
    let region = one(s, &BLK_REGION)?;
    let random_ppm = one(s, &random_spec)?;
    let mut dev = blk::find().map_err(error)?;
    if region > dev.capacity() {
        return Err(error("the region is larger than the disk: lower `region` or make the disk larger (--disk-size)"));
    }
    let largest_bs = sizes[..n_sizes].iter().copied().max().unwrap_or(PAGE);
    let deepest = depths[..n_depths].iter().copied().max().unwrap_or(1);
    if deepest > dev.slots() as u64 {
        return Err(error("the queue depth is more than the driver's slots"));
    }
    let buffers = buffer(largest_bs * deepest)?;
    if op == Op::Write {
        fill(buffers, 0);
    }
    let smallest_bs = sizes[..n_sizes].iter().copied().min().unwrap_or(PAGE);
    let tracked = (region / smallest_bs <= MAX_TRACKED_BLOCKS && op == Op::Write)
        .then(|| alloc_work((region / smallest_bs).div_ceil(8), PAGE))
        .flatten();
    let mut histogram = Histogram::new();
    for i in 0..n_sizes {
        for j in 0..n_depths {
            let plan = Plan {
                op,
                bs: sizes[i],
                qd: u16::try_from(depths[j]).unwrap_or(1),
                region,
                random_ppm,
            };
            let series = super::memory::Series::new()
                .push(bs_spec.key, size_texts[i])
                .push(qd_spec.key, depth_texts[j]);
            // Each series marks its own blocks: a bitmap per block size.
            if let Some(bitmap) = tracked {
                // SAFETY: the bitmap allocated above, of region / smallest_bs bits.
                unsafe {
                    core::ptr::write_bytes(
                        bitmap as *mut u8,
                        0,
                        usize_from((region / plan.bs).div_ceil(8)),
                    )
                };
            }
            let mut cursor = Cursor {
                rng: Rng::new(i as u64 * 16 + j as u64 + 1),
                next_seq: 0,
                written: tracked,
            };
            sample_series(
                s,
                &mut dev,
                &plan,
                series.as_str(),
                buffers,
                &mut cursor,
                &mut histogram,
            )?;
            if op == Op::Write {
                verify(&mut dev, &plan, buffers, tracked)?;
            }
        }
    }
    Ok(())
}

/// The samples of one series (warm-ups first), each with its metrics.
fn sample_series(
    s: &Sampler,
    dev: &mut Device,
    plan: &Plan,
    series: &str,
    buffers: &mut [u8],
    cursor: &mut Cursor,
    histogram: &mut Histogram,
) -> Result<(), Refusal> {
    let mut n = plan.qd as u64;
    loop {
        histogram.clear();
        let (_, cycles) = burst(dev, plan, n, buffers, cursor, histogram)?;
        if (cycles >= sample_cycles(s) && n >= MIN_REQUESTS) || n >= MAX_REQUESTS {
            break;
        }
        n *= 2;
    }
    for (index, warmup) in s.rounds() {
        histogram.clear();
        let (bytes, cycles) = burst(dev, plan, n, buffers, cursor, histogram)?;
        emit(s, series, index, warmup, n, bytes, cycles, histogram);
    }
    Ok(())
}

/// One sample's lines: IOPS, MB/s (where the row has it), latency percentiles.
#[allow(clippy::too_many_arguments)]
fn emit(
    s: &Sampler,
    series: &str,
    index: u64,
    warmup: bool,
    requests: u64,
    bytes: u64,
    cycles: u64,
    h: &Histogram,
) {
    s.emit_metric_sample("iops", series, index, warmup, requests, cycles);
    if bytes > 0 {
        s.emit_metric_sample("bandwidth", series, index, warmup, bytes, cycles);
    }
    for (metric, ppm) in [
        ("lat_p50", 500_000),
        ("lat_p90", 900_000),
        ("lat_p99", 990_000),
        ("lat_p999", 999_000),
    ] {
        s.emit_metric_sample(metric, series, index, warmup, 1, h.quantile(ppm));
    }
    s.emit_metric_sample("lat_max", series, index, warmup, 1, h.max());
}

/// Runs `n` requests of `plan` with `qd` in flight; (bytes moved, cycles taken).
fn burst(
    dev: &mut Device,
    plan: &Plan,
    n: u64,
    buffers: &mut [u8],
    cursor: &mut Cursor,
    histogram: &mut Histogram,
) -> Result<(u64, u64), Refusal> {
    let mut submitted_at = [0u64; crate::blk::MAX_SLOTS as usize];
    let start = rdtsc_fenced();
    let mut submitted = 0u64;
    for tag in 0..plan.qd.min(u16::try_from(n).unwrap_or(u16::MAX)) {
        submit(dev, plan, tag, buffers, cursor, &mut submitted_at)?;
        submitted += 1;
    }
    dev.kick();
    let mut done = 0u64;
    let mut empty = 0u64;
    while done < n {
        let mut requeued = false;
        while let Some(c) = dev.poll() {
            let now = rdtsc_fenced();
            let tag = c.tag as usize;
            let at = *submitted_at.get(tag).ok_or(error(
                "the block device returned a request it was not given",
            ))?;
            if c.status != S_OK {
                return Err(error(
                    "the block device failed a well-formed request (status IOERR or UNSUPP)",
                ));
            }
            histogram.record(now.wrapping_sub(at));
            done += 1;
            if submitted < n {
                submit(dev, plan, c.tag, buffers, cursor, &mut submitted_at)?;
                submitted += 1;
                requeued = true;
            }
        }
        if requeued {
            dev.kick();
            empty = 0;
            continue;
        }
        empty += 1;
        if empty.is_multiple_of(POLLS_PER_STATUS as u64) && dev.needs_reset() {
            return Err(error(
                "the block device asked for a reset during a well-formed workload",
            ));
        }
        if empty > MAX_EMPTY_POLLS {
            return Err(error("the block device did not complete a request"));
        }
        core::hint::spin_loop();
    }
    let cycles = rdtsc_fenced().wrapping_sub(start);
    let bytes = if plan.op == Op::Flush { 0 } else { n * plan.bs };
    Ok((bytes, cycles))
}

fn submit(
    dev: &mut Device,
    plan: &Plan,
    tag: u16,
    buffers: &mut [u8],
    cursor: &mut Cursor,
    submitted_at: &mut [u64],
) -> Result<(), Refusal> {
    let offset = cursor.next(plan);
    let bs = usize_from(plan.bs);
    let slot = &mut buffers[tag as usize * bs..][..bs];
    if plan.op == Op::Write {
        stamp(slot, offset);
    }
    let len = u32::try_from(plan.bs).unwrap_or(u32::MAX);
    let addr = slot.as_ptr() as u64;
    submitted_at[tag as usize] = rdtsc_fenced();
    dev.queue(tag, plan.op, offset, addr, len)
        .map_err(|e| error(e.message()))
}

/// Reads the region back: every block this series wrote holds its pattern, every other
/// block holds zeros or a pattern (an earlier write's).
fn verify(
    dev: &mut Device,
    plan: &Plan,
    buffers: &mut [u8],
    written: Option<u64>,
) -> Result<(), Refusal> {
    // Read back in pieces of up to 1 MiB (whole blocks) through the write buffers.
    let per_read = (buffers.len() as u64).min(1 << 20) / plan.bs;
    let blocks = plan.region / plan.bs;
    let mut block = 0;
    while block < blocks {
        let count = per_read.min(blocks - block);
        let buf = &mut buffers[..usize_from(count * plan.bs)];
        read_one(dev, block * plan.bs, buf)?;
        for (i, data) in buf.chunks(usize_from(plan.bs)).enumerate() {
            let b = block + i as u64;
            let wrote = written.is_some_and(|bitmap| {
                // SAFETY: one bit per block of this series, as `Cursor::next` set them.
                unsafe { read_volatile((bitmap + b / 8) as *const u8) & (1 << (b % 8)) != 0 }
            });
            check_block(data, b * plan.bs, wrote)?;
        }
        block += count;
    }
    // Restore the write buffers' pattern for the next series (verification read over them).
    fill(buffers, 0);
    Ok(())
}

/// Each 512-byte sector of a block read back holds its pattern (all of them where this
/// series wrote the block), or zeros where nothing was written.
fn check_block(buf: &[u8], offset: u64, wrote: bool) -> Result<(), Refusal> {
    for (i, sector) in buf.chunks(usize_from(STAMP_UNIT)).enumerate() {
        match (classify(sector, offset + STAMP_UNIT * i as u64), wrote) {
            (BlockContent::Pattern, _) | (BlockContent::Zero, false) => {}
            (BlockContent::Zero, true) => {
                return Err((
                    Status::Failure,
                    "a block the guest wrote reads back as zeros: the write was lost",
                ))
            }
            (BlockContent::Other, _) => {
                return Err((
                    Status::Failure,
                    "a block reads back with data the guest never wrote: corrupted",
                ))
            }
        }
    }
    Ok(())
}

/// One read of `buf.len()` bytes at `offset`, waited for.
fn read_one(dev: &mut impl BlockDevice, offset: u64, buf: &mut [u8]) -> Result<(), Refusal> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    dev.queue(0, Op::Read, offset, buf.as_ptr() as u64, len)
        .map_err(|e| error(e.message()))?;
    dev.kick();
    wait_one(dev).and_then(|status| {
        if status == S_OK {
            Ok(())
        } else {
            Err(error("reading the region back failed"))
        }
    })
}

/// Waits for the one request in flight; its status byte.
fn wait_one(dev: &mut impl BlockDevice) -> Result<u8, Refusal> {
    for poll in 0..MAX_EMPTY_POLLS {
        if let Some(c) = dev.poll() {
            return Ok(c.status);
        }
        if poll % POLLS_PER_STATUS as u64 == 0 && poll > 0 && dev.needs_reset() {
            return Err(error("the block device asked for a reset"));
        }
        core::hint::spin_loop();
    }
    Err(error("the block device did not complete a request"))
}

/// `io.blk-flush`: a 4 KiB write, then a flush, one at a time; the flush is timed.
pub fn flush(s: &Sampler) -> Result<(), Refusal> {
    let region = one(s, &BLK_REGION)?;
    let mut dev = blk::find().map_err(error)?;
    if region > dev.capacity() {
        return Err(error("the region is larger than the disk"));
    }
    let buf = buffer(PAGE)?;
    fill(buf, 0);
    let mut rng = Rng::new(0xf1);
    let mut histogram = Histogram::new();
    let mut pair = |n: u64, h: &mut Histogram| -> Result<u64, Refusal> {
        let start = rdtsc_fenced();
        for _ in 0..n {
            let offset = rng.below(region / PAGE) * PAGE;
            stamp(buf, offset);
            dev.queue(0, Op::Write, offset, buf.as_ptr() as u64, PAGE_U32)
                .map_err(|e| error(e.message()))?;
            dev.kick();
            expect_ok(wait_one(&mut dev)?)?;
            let at = rdtsc_fenced();
            dev.queue(1, Op::Flush, 0, 0, 0)
                .map_err(|e| error(e.message()))?;
            dev.kick();
            expect_ok(wait_one(&mut dev)?)?;
            h.record(rdtsc_fenced().wrapping_sub(at));
        }
        Ok(rdtsc_fenced().wrapping_sub(start))
    };
    let mut n = 1;
    let min_cycles = sample_cycles(s);
    while (pair(n, &mut histogram)? < min_cycles || n < MIN_REQUESTS) && n < MAX_REQUESTS {
        n *= 2;
    }
    for (index, warmup) in s.rounds() {
        histogram.clear();
        let cycles = pair(n, &mut histogram)?;
        emit(s, "", index, warmup, n, 0, cycles, &histogram);
    }
    Ok(())
}

fn expect_ok(status: u8) -> Result<(), Refusal> {
    if status == S_OK {
        Ok(())
    } else {
        Err(error("the block device failed a well-formed request"))
    }
}

/// One malformed request of the self-test: what it breaks and the answer it must get.
struct Case {
    name: &'static str,
    kind: u32,
    /// Sector, or `None` for the last sector of the disk.
    sector: Option<u64>,
    data: Option<Descriptor>,
    status: bool,
    expect: Expect,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Status(u8),
    Reset,
}

/// `selftest.blk-corrupt`: each malformed request must be refused, and a good one served
/// after; the workload then ends as an error naming what was refused.
pub fn corrupt(_: &Sampler) -> Result<(), Refusal> {
    let mut dev = VirtioBlk::init().map_err(error)?;
    let buf = buffer(2 << 20)?.as_ptr() as u64;
    let w = DESC_F_WRITE | DESC_F_NEXT;
    let d = |addr, len, flags| {
        Some(Descriptor {
            addr,
            len,
            flags,
            next: 2,
        })
    };
    let cases = [
        Case {
            name: "a read past the end of the disk",
            kind: T_IN,
            sector: None,
            data: d(buf, 8192, w),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "a write past the end of the disk",
            kind: T_OUT,
            sector: None,
            data: d(buf, 8192, DESC_F_NEXT),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "a buffer outside guest RAM",
            kind: T_IN,
            sector: Some(0),
            data: d(0x40_0000_0000, 4096, w),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "a read into a device-readable buffer",
            kind: T_IN,
            sector: Some(0),
            data: d(buf, 4096, DESC_F_NEXT),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "a ragged length",
            kind: T_IN,
            sector: Some(0),
            data: d(buf, 100, w),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "an oversized request",
            kind: T_IN,
            sector: Some(0),
            data: d(buf, 2 << 20, w),
            status: true,
            expect: Expect::Status(S_IOERR),
        },
        Case {
            name: "an unknown request type",
            kind: 77,
            sector: Some(0),
            data: d(buf, 4096, w),
            status: true,
            expect: Expect::Status(S_UNSUPP),
        },
        Case {
            name: "a chain without a status byte",
            kind: T_IN,
            sector: Some(0),
            data: None,
            status: false,
            expect: Expect::Reset,
        },
    ];
    for case in &cases {
        let got = send(&mut dev, case)?;
        if got != case.expect {
            return Err((Status::Failure, case.name));
        }
        if got == Expect::Reset {
            dev.reset_and_start().map_err(error)?;
        }
    }
    // The device carries on: a good read is served.
    let page = buffer(PAGE)?;
    read_one(&mut dev, 0, page).map_err(|_| {
        (
            Status::Failure,
            "the device served nothing after refusing the malformed requests",
        )
    })?;
    Err(error(
        "refused as it must: 7 malformed virtio-blk requests answered IOERR/UNSUPP (past the end \
         read and write, a buffer outside RAM, a wrong direction, a ragged and an oversized \
         length, an unknown type), a chain without a status byte answered DEVICE_NEEDS_RESET; \
         a good request was served after",
    ))
}

/// Sends one crafted chain (descriptors 0.. of the table) and waits for the answer.
fn send(dev: &mut VirtioBlk, case: &Case) -> Result<Expect, Refusal> {
    let sector = case.sector.unwrap_or(dev.capacity() / 512 - 1);
    dev.set_header(0, case.kind, sector);
    let header = dev.header(0);
    let status = Descriptor {
        addr: header + HEADER_LEN as u64,
        len: 1,
        flags: DESC_F_WRITE,
        next: 0,
    };
    let mut head = Descriptor {
        addr: header,
        len: HEADER_LEN,
        flags: 0,
        next: 1,
    };
    if case.data.is_some() || case.status {
        head.flags = DESC_F_NEXT;
    }
    dev.set_descriptor(0, head);
    match case.data {
        Some(data) => {
            dev.set_descriptor(1, data);
            dev.set_descriptor(2, status);
        }
        None if case.status => dev.set_descriptor(1, status),
        None => {}
    }
    dev.offer(0);
    dev.kick();
    for poll in 0..MAX_EMPTY_POLLS {
        if dev.poll().is_some() {
            return Ok(Expect::Status(dev.status_byte(0)));
        }
        if poll % 1024 == 0 && dev.needs_reset() {
            return Ok(Expect::Reset);
        }
        core::hint::spin_loop();
    }
    Ok(Expect::Status(STATUS_PENDING))
}
