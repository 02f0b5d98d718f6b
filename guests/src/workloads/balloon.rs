//! The guest side of `mem.balloon` and `selftest.balloon-corrupt`.
//!
//! The host drives: it sets a target, the guest hands pages back until it is met, says so,
//! waits for the target to drop to zero, takes the pages back, touches them, says so, and
//! starts the next cycle. The pages come from a pool in the work arena that nothing else
//! uses; the guest touches the pool first, so that every page it gives was backed by the
//! host, and never touches a page while the host holds it.
//!
//! KVM: the virtio-balloon of hvbench's VMM (target in its config space, pages on the
//! inflate and deflate queues). Xen: the target is `memory/target` in xenstore (KiB), pages
//! go back with XENMEM_decrease_reservation and return with XENMEM_populate_physmap.

use core::ptr::{read_volatile, write_volatile};

use workloads::balloon::{PHASE_DEFLATED, PHASE_INFLATED, PHASE_KEY, PHASE_READY};
use workloads::protocol::Status;
use workloads::table::param::BALLOON_SIZE;
use workloads::virtio::{
    DESC_F_NEXT, DESC_F_WRITE, PFNS_PER_BUFFER, QUEUE_DEFLATE, QUEUE_INFLATE,
    STATUS_DEVICE_NEEDS_RESET,
};
use workloads::Hypervisor;

use crate::arch::cpu::rdtsc_fenced;
use crate::arch::user::syscall;
use crate::hypervisor::xen::{
    MemoryReservation, DOMID_SELF, XENMEM_DECREASE_RESERVATION, XENMEM_POPULATE_PHYSMAP,
};
use crate::hypervisor::xenstore::Xenstore;
use crate::mem::arena::{alloc_work, HUGE_PAGE, PAGE};
use crate::sampler::{Refusal, Sampler};
use crate::start_info::ram_end;
use crate::sysabi::{BootInfo, Syscall};
use crate::virtio::{Balloon, Descriptor, TransferError, QUEUE_SIZE};

/// Yields between re-reads of Xen's target when no watch event comes.
const XEN_PAUSE_YIELDS: u32 = 100_000;

fn error(reason: &'static str) -> Refusal {
    (Status::Error, reason)
}

/// How the guest talks to one hypervisor's balloon.
trait BalloonPort {
    /// Pages the host wants back now.
    fn target_pages(&mut self) -> Result<u64, Refusal>;
    /// Hands `count` (at most 256) consecutive pages from `first_pfn` to the host.
    fn give(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal>;
    /// Takes them back.
    fn take(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal>;
    /// Tells the host how many pages the balloon holds (where the interface has a place).
    fn report(&mut self, pages: u64);
    /// Waits a little between looks at the target.
    fn pause(&mut self) -> Result<(), Refusal>;
}

struct VirtioPort {
    device: Balloon,
    pause_cycles: u64,
}

impl BalloonPort for VirtioPort {
    fn target_pages(&mut self) -> Result<u64, Refusal> {
        Ok(self.device.target_pages() as u64)
    }

    fn give(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal> {
        self.device
            .transfer(QUEUE_INFLATE, first_pfn, count)
            .map_err(|e| error(e.message()))
    }

    fn take(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal> {
        self.device
            .transfer(QUEUE_DEFLATE, first_pfn, count)
            .map_err(|e| error(e.message()))
    }

    fn report(&mut self, pages: u64) {
        // The device's `actual` is 32 bits; a balloon that large is bigger than any guest.
        self.device
            .set_actual(u32::try_from(pages).unwrap_or(u32::MAX));
    }

    fn pause(&mut self) -> Result<(), Refusal> {
        // Each look at the target is an exit: space them out.
        let start = rdtsc_fenced();
        while rdtsc_fenced().wrapping_sub(start) < self.pause_cycles {
            core::hint::spin_loop();
        }
        Ok(())
    }
}

struct XenPort {
    store: Xenstore,
    /// `memory/target` when the workload started, in KiB: the balloon is what the host
    /// took off it since.
    initial_kib: u64,
    /// A page for the extent (GFN) array of one hypercall.
    extents: u64,
}

impl XenPort {
    fn reservation(&mut self, cmd: u64, first_pfn: u64, count: usize) -> Result<(), Refusal> {
        let count = count.min(PFNS_PER_BUFFER);
        let gfns = self.extents as *mut u64;
        for i in 0..count {
            // SAFETY: `extents` is a page of ours; 256 u64s fill half of it.
            unsafe { write_volatile(gfns.add(i), first_pfn + i as u64) };
        }
        let reservation = MemoryReservation {
            extent_start: self.extents,
            nr_extents: count as u64,
            extent_order: 0,
            mem_flags: 0,
            domid: DOMID_SELF,
        };
        // Xen's signed result as its bits: an error, negative, never equals a count.
        let done = syscall(
            Syscall::XenMemoryOp as u64,
            cmd,
            &reservation as *const MemoryReservation as u64,
            0,
        );
        if done == count as u64 {
            Ok(())
        } else if cmd == XENMEM_DECREASE_RESERVATION {
            Err(error(
                "Xen released fewer pages than XENMEM_decrease_reservation asked for",
            ))
        } else {
            Err(error(
                "Xen populated fewer pages than XENMEM_populate_physmap asked for (is the \
                 domain's maximum below its target?)",
            ))
        }
    }
}

impl BalloonPort for XenPort {
    fn target_pages(&mut self) -> Result<u64, Refusal> {
        let kib = self.store.read_number("memory/target").map_err(error)?;
        Ok(self.initial_kib.saturating_sub(kib) / 4)
    }

    fn give(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal> {
        self.reservation(XENMEM_DECREASE_RESERVATION, first_pfn, count)
    }

    fn take(&mut self, first_pfn: u64, count: usize) -> Result<(), Refusal> {
        self.reservation(XENMEM_POPULATE_PHYSMAP, first_pfn, count)
    }

    fn report(&mut self, _pages: u64) {
        // The host reads what the domain holds from Xen itself (`xl list`).
    }

    fn pause(&mut self) -> Result<(), Refusal> {
        // Until the watch on memory/target fires, looking only at the ring's indexes; the
        // bound re-reads the target now and then should an event ever be missed.
        for _ in 0..XEN_PAUSE_YIELDS {
            if self.store.watch_fired().map_err(error)? {
                break;
            }
            syscall(Syscall::Yield as u64, 0, 0, 0);
        }
        Ok(())
    }
}

/// Writes one word to each page: the first write after a deflate faults the page in again.
fn touch(pool: u64, pages: u64) -> u64 {
    let start = rdtsc_fenced();
    for p in 0..pages {
        // SAFETY: a page of the pool, which the guest holds (not ballooned) right now.
        unsafe { write_volatile((pool + p * PAGE) as *mut u64, p | 1) };
    }
    rdtsc_fenced().wrapping_sub(start)
}

fn wait_for(port: &mut dyn BalloonPort, done: impl Fn(u64) -> bool) -> Result<u64, Refusal> {
    // No limit here: the host stops the guest when its time for the workload is up.
    loop {
        let target = port.target_pages()?;
        if done(target) {
            return Ok(target);
        }
        port.pause()?;
    }
}

/// Moves the whole pool through `step` in 1 MiB requests; returns the cycles taken.
fn move_pool(
    pool: u64,
    pages: u64,
    mut step: impl FnMut(u64, usize) -> Result<(), Refusal>,
) -> Result<u64, Refusal> {
    let first_pfn = pool / PAGE;
    let start = rdtsc_fenced();
    let mut done = 0;
    while done < pages {
        let n = usize::try_from(pages - done).map_or(PFNS_PER_BUFFER, |n| n.min(PFNS_PER_BUFFER));
        step(first_pfn + done, n)?;
        done += n as u64;
    }
    Ok(rdtsc_fenced().wrapping_sub(start))
}

fn cycles(s: &Sampler, port: &mut dyn BalloonPort, pool: u64, pages: u64) -> Result<(), Refusal> {
    for (index, warmup) in s.rounds() {
        s.note_text(PHASE_KEY, PHASE_READY);
        let target = wait_for(port, |t| t != 0)?;
        if target != pages {
            return Err(error(
                "the host's balloon target is not the pool's size (parameter `size`)",
            ));
        }
        let inflate = move_pool(pool, pages, |pfn, n| port.give(pfn, n))?;
        port.report(pages);
        s.emit_metric_sample("inflate", "", index, warmup, pages * PAGE, inflate);
        s.note_text(PHASE_KEY, PHASE_INFLATED);
        wait_for(port, |t| t == 0)?;
        let deflate = move_pool(pool, pages, |pfn, n| port.take(pfn, n))?;
        port.report(0);
        s.emit_metric_sample("deflate", "", index, warmup, pages * PAGE, deflate);
        let touched = touch(pool, pages);
        s.emit_metric_sample("touch_after_deflate", "", index, warmup, pages, touched);
        s.note_text(PHASE_KEY, PHASE_DEFLATED);
    }
    Ok(())
}

/// `mem.balloon`.
pub fn balloon(s: &Sampler, info: &BootInfo) -> Result<(), Refusal> {
    let size = s
        .param(&BALLOON_SIZE)
        .ok_or(error("parameter `size` has no value"))
        .and_then(|text| BALLOON_SIZE.parse_one(text).map_err(|e| error(e.message())))?;
    let pages = size / PAGE;
    let pool = alloc_work(size, HUGE_PAGE).ok_or(error(
        "not enough guest memory for the balloon's pool: give the guest more (--memory-mib)",
    ))?;
    touch(pool, pages);
    s.note_hex("pool_pages", pages);
    match info.hypervisor.kind {
        Hypervisor::Kvm => {
            let device = Balloon::init().map_err(error)?;
            let khz = if info.tsc_khz > 0 {
                info.tsc_khz
            } else {
                1_000_000
            };
            let mut port = VirtioPort {
                device,
                // 100 us between looks at the target.
                pause_cycles: khz / 10,
            };
            cycles(s, &mut port, pool, pages)
        }
        Hypervisor::Xen => {
            let mut store = Xenstore::open().ok_or(error("Xen named no xenstore ring"))?;
            let initial_kib = store.read_number("memory/target").map_err(error)?;
            store.watch("memory/target", "hvbench").map_err(error)?;
            let extents = alloc_work(PAGE, PAGE).ok_or(error("no memory for the extent array"))?;
            let mut port = XenPort {
                store,
                initial_kib,
                extents,
            };
            cycles(s, &mut port, pool, pages)
        }
        _ => Err((
            Status::Skip,
            "mem.balloon needs hvbench's VMM on KVM (virtio-balloon) or Xen",
        )),
    }
}

/// Fills the victim page with a pattern that a released page (read back as zeros) lacks.
fn mark(victim: u64) {
    for i in 0..PAGE / 8 {
        // SAFETY: the victim page is ours, identity-mapped.
        unsafe { write_volatile((victim + i * 8) as *mut u64, 0x5a5a_0000_0000_0000 | i) };
    }
}

fn intact(victim: u64) -> bool {
    (0..PAGE / 8).all(|i| {
        // SAFETY: as in `mark`.
        unsafe { read_volatile((victim + i * 8) as *const u64) == 0x5a5a_0000_0000_0000 | i }
    })
}

/// One malformed request of `selftest.balloon-corrupt`: its name, and how to submit it.
type Case<'a> = (
    &'static str,
    &'a dyn Fn(&mut Balloon) -> Result<(), TransferError>,
);

/// Submits each case on a freshly reset device and notes the device's verdict; returns
/// whether any was accepted and whether any released the victim page.
fn try_cases(
    s: &Sampler,
    device: &mut Balloon,
    victim: u64,
    cases: &[Case],
) -> Result<(bool, bool), Refusal> {
    let mut accepted = false;
    let mut released = false;
    for (name, case) in cases {
        device.reset_and_start().map_err(error)?;
        mark(victim);
        let verdict = match case(device) {
            Err(TransferError::Refused) => "refused",
            Ok(()) => {
                accepted = true;
                "accepted"
            }
            Err(TransferError::NoAnswer) => {
                accepted = true;
                "no_answer_and_no_error"
            }
            Err(TransferError::WrongBuffer) => {
                accepted = true;
                "wrong_buffer_returned"
            }
            // The driver's own refusal, before the device saw anything: no verdict.
            Err(e @ TransferError::PfnTooWide) => return Err(error(e.message())),
        };
        s.note_text(name, verdict);
        if !intact(victim) {
            released = true;
            s.note_text(name, "victim_page_released");
        }
    }
    Ok((accepted, released))
}

/// After a reset the device must serve a valid request again, and really release the
/// page: returns whether the inflate dropped the victim's contents.
fn recovers(
    s: &Sampler,
    device: &mut Balloon,
    victim: u64,
    victim_pfn: u32,
) -> Result<bool, Refusal> {
    device.reset_and_start().map_err(error)?;
    if Balloon::status() & STATUS_DEVICE_NEEDS_RESET != 0 {
        return Err((Status::Failure, "the device still needs a reset after one"));
    }
    mark(victim);
    device
        .transfer(QUEUE_INFLATE, u64::from(victim_pfn), 1)
        .map_err(|_| {
            (
                Status::Failure,
                "after a reset the device refused a valid request",
            )
        })?;
    let dropped = !intact(victim);
    device
        .transfer(QUEUE_DEFLATE, u64::from(victim_pfn), 1)
        .map_err(|_| {
            (
                Status::Failure,
                "after a reset the device refused a valid deflate",
            )
        })?;
    s.note_text(
        "recovered",
        if dropped { "yes" } else { "page_not_released" },
    );
    Ok(dropped)
}

/// `selftest.balloon-corrupt`: malformed requests the VMM must refuse, each on a freshly
/// reset device, none of which may release the victim page they name.
pub fn corrupt(s: &Sampler, info: &BootInfo) -> Result<(), Refusal> {
    if info.hypervisor.kind != Hypervisor::Kvm {
        return Err((
            Status::Skip,
            "this self-test corrupts the queues of hvbench's own virtio-balloon (KVM)",
        ));
    }
    let mut device = Balloon::init().map_err(error)?;
    let victim = alloc_work(PAGE, PAGE).ok_or(error("no memory for the victim page"))?;
    let list = alloc_work(PAGE, PAGE).ok_or(error("no memory for the PFN list"))?;
    let outside = ram_end(info.start_info).saturating_add(1 << 30);
    // The balloon's PFNs are 32 bits.
    let pfn32 =
        |addr: u64| u32::try_from(addr / PAGE).map_err(|_| error("a PFN wider than 32 bits"));
    let (victim_pfn, outside_pfn) = (pfn32(victim)?, pfn32(outside)?);
    // The PFN list: the victim first, then a page beyond RAM.
    // SAFETY: `list` is a page of ours.
    unsafe {
        write_volatile(list as *mut u32, victim_pfn);
        write_volatile((list + 4) as *mut u32, outside_pfn);
    }
    let buffer = |len: u32, flags: u16, next: u16| Descriptor {
        addr: list,
        len,
        flags,
        next,
    };
    let cases: [Case; 8] = [
        ("head_outside_queue", &|d| {
            d.submit(QUEUE_INFLATE, &[buffer(4, 0, 0)], Some(QUEUE_SIZE + 7))
        }),
        ("buffer_outside_ram", &|d| {
            let far = Descriptor {
                addr: outside,
                len: 4,
                flags: 0,
                next: 0,
            };
            d.submit(QUEUE_INFLATE, &[far], None)
        }),
        ("pfn_outside_ram", &|d| {
            d.submit(QUEUE_INFLATE, &[buffer(8, 0, 0)], None)
        }),
        ("write_only_buffer", &|d| {
            d.submit(QUEUE_INFLATE, &[buffer(4, DESC_F_WRITE, 0)], None)
        }),
        ("ragged_length", &|d| {
            d.submit(QUEUE_INFLATE, &[buffer(6, 0, 0)], None)
        }),
        ("oversized_buffer", &|d| {
            d.submit(QUEUE_INFLATE, &[buffer(1 << 20, 0, 0)], None)
        }),
        ("broken_chain", &|d| {
            d.submit(
                QUEUE_INFLATE,
                &[buffer(4, DESC_F_NEXT, QUEUE_SIZE * 8)],
                None,
            )
        }),
        ("avail_index_jump", &|d| {
            d.bump_avail_index(QUEUE_DEFLATE, QUEUE_SIZE * 4)
        }),
    ];
    let (accepted, released) = try_cases(s, &mut device, victim, &cases)?;
    let dropped = recovers(s, &mut device, victim, victim_pfn)?;
    if released {
        return Err((
            Status::Failure,
            "the VMM released a page named by a request it refused",
        ));
    }
    if accepted {
        return Err((
            Status::Failure,
            "the VMM accepted a malformed balloon request",
        ));
    }
    if !dropped {
        return Err((
            Status::Failure,
            "the VMM used a valid inflate request but the page kept its contents",
        ));
    }
    Ok(())
}
