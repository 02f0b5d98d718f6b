//! Memory kernels shared by the guest and the host's native twins: the same code, built
//! the same way (this crate's opt-level is pinned in every profile), on both sides.
//!
//! They work on raw addresses because the guest maps its buffers itself; callers own the
//! buffers and uphold the safety contracts.

/// Seed of every pointer chase, so the guest and the native twin build the same cycle.
pub const CHASE_SEED: u64 = 0x5eed_c4a5_e000_0001;

/// Bytes between chase elements: one element per 4 KiB page.
pub const CHASE_STRIDE: usize = 4096;

/// Byte offset of element `i` within its page: spread over the 64 cache lines of a page,
/// so the chase does not hammer one cache set.
pub fn chase_offset(i: usize) -> usize {
    (i.wrapping_mul(37) % 64) * 64
}

/// Builds a single random cycle through `pages` pages of the buffer at `base` (Sattolo's
/// algorithm, xorshift from `seed`): each element holds the address of the next one.
/// Returns the address of the first element.
///
/// # Safety
/// `base` must point to `pages * CHASE_STRIDE` writable bytes, 8-byte aligned.
pub unsafe fn build_chase(base: *mut u8, pages: usize, seed: u64) -> *const usize {
    let slot = |i: usize| {
        base.wrapping_add(i * CHASE_STRIDE + chase_offset(i))
            .cast::<usize>()
    };
    // The permutation lives in each page's second word while it is shuffled.
    let perm = |i: usize| slot(i).wrapping_add(1);
    // SAFETY: every slot and perm word is inside the caller's buffer.
    unsafe {
        for i in 0..pages {
            perm(i).write_volatile(i);
        }
        let mut x = seed | 1;
        let mut k = pages;
        while k > 1 {
            k -= 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // x % k < k, which is a usize: it cannot truncate.
            #[allow(clippy::cast_possible_truncation)]
            let j = (x % k as u64) as usize;
            let (a, b) = (perm(k).read_volatile(), perm(j).read_volatile());
            perm(k).write_volatile(b);
            perm(j).write_volatile(a);
        }
        for i in 0..pages {
            let from = perm(i).read_volatile();
            let to = perm((i + 1) % pages).read_volatile();
            slot(from).write_volatile(slot(to) as usize);
        }
        slot(perm(0).read_volatile()) as *const usize
    }
}

/// Follows the chain `steps` times; returns where it ended (so the loads cannot be
/// dropped).
///
/// # Safety
/// `start` must be an element of a chain built by [`build_chase`] whose buffer is live.
#[inline(never)]
pub unsafe fn chase(start: *const usize, steps: u64) -> *const usize {
    let mut p = start;
    for _ in 0..steps {
        // SAFETY: every element holds the address of another element of the chain.
        p = unsafe { p.read_volatile() } as *const usize;
    }
    p
}

/// Reads `len` bytes (whole u64 words) and returns their wrapping sum.
///
/// # Safety
/// `base` must point to `len` readable bytes, 8-byte aligned.
#[inline(never)]
pub unsafe fn sum_words(base: *const u64, len: usize) -> u64 {
    let words = len / 8;
    let mut acc = [0u64; 4];
    let mut i = 0;
    while i + 4 <= words {
        // SAFETY: i + 3 < words, inside the buffer.
        unsafe {
            acc[0] = acc[0].wrapping_add(*base.add(i));
            acc[1] = acc[1].wrapping_add(*base.add(i + 1));
            acc[2] = acc[2].wrapping_add(*base.add(i + 2));
            acc[3] = acc[3].wrapping_add(*base.add(i + 3));
        }
        i += 4;
    }
    acc[0]
        .wrapping_add(acc[1])
        .wrapping_add(acc[2])
        .wrapping_add(acc[3])
}

/// Copies `len` bytes with `rep movsb`: one instruction, the same on both sides (a
/// library memcpy would differ between the guest and the host).
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes; the ranges do not overlap.
#[inline(never)]
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract; the direction flag is clear in both environments.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") len => _,
            options(nostack, preserves_flags)
        );
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn chase_visits_every_page_once() {
        let pages = 257;
        let mut buf = vec![0u8; pages * CHASE_STRIDE + 64];
        let base = ((buf.as_mut_ptr() as usize + 7) & !7) as *mut u8;
        // SAFETY: the buffer holds `pages` strides (plus alignment slack).
        let start = unsafe { build_chase(base, pages, 42) };
        let mut seen = vec![false; pages];
        let mut p = start;
        for _ in 0..pages {
            let page = (p as usize - base as usize) / CHASE_STRIDE;
            assert!(!seen[page], "page {page} visited twice");
            seen[page] = true;
            // SAFETY: p is an element of the chain.
            p = unsafe { chase(p, 1) };
        }
        assert_eq!(p, start, "a single cycle");
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn sum_and_copy() {
        let src: std::vec::Vec<u64> = (1..=1000).collect();
        // SAFETY: the vector holds 1000 words.
        assert_eq!(unsafe { sum_words(src.as_ptr(), 8000) }, 500_500);
        let mut dst = vec![0u64; 1000];
        // SAFETY: both hold 8000 bytes and do not overlap.
        unsafe {
            copy_bytes(
                dst.as_mut_ptr().cast::<u8>(),
                src.as_ptr().cast::<u8>(),
                8000,
            )
        };
        assert_eq!(dst, src);
    }
}
