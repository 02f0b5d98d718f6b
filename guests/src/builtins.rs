//! The memory functions the compiler expects from a C library. With `-nostdlib` nobody
//! else provides them. String instructions keep them short and stop the compiler from
//! recognising the loop and calling the function from itself.

use core::arch::asm;

/// # Safety
/// C `memcpy` contract: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds memcpy's contract; DF is clear.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove` contract: `n` bytes readable at `src`, writable at `dst`; may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst above src: copy backwards, with DF restored after.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

/// # Safety
/// C `memset` contract: `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // C stores `(unsigned char)value`: its low byte.
    let byte = value.to_le_bytes()[0];
    // SAFETY: the caller upholds memset's contract; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") byte,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp` contract: `n` bytes readable at both pointers.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, within both buffers by the caller's contract.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
