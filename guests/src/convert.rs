//! Integer conversions the guest makes in many places, each exact for the reason given.

// The guest is x86-64 only (PVH entry, long mode): a usize is 64 bits, as wide as a u64.
const _: () = assert!(usize::BITS == u64::BITS);

/// A size, count or address as a `usize`: exact, a usize is 64 bits here.
#[allow(clippy::cast_possible_truncation)]
#[inline(always)]
pub const fn usize_from(x: u64) -> usize {
    x as usize
}

/// The low 32 bits of `x`, for a value written as two 32-bit halves (EDX:EAX, a device's
/// LOW/HIGH registers): dropping the high half is the point.
#[allow(clippy::cast_possible_truncation)]
#[inline(always)]
pub const fn low32(x: u64) -> u32 {
    x as u32
}
