//! `mem.balloon`: the phase notes by which the host and the guest take
//! turns (the guest says `ready`, the host sets the target, the guest says `inflated`, ...).

/// The note key of the guest's phase lines.
pub const PHASE_KEY: &str = "balloon";
/// Phase: the pool is back in the guest; the host may set the target.
pub const PHASE_READY: &str = "ready";
/// Phase: the guest handed the pool over.
pub const PHASE_INFLATED: &str = "inflated";
/// Phase: the guest took the pool back and touched it.
pub const PHASE_DEFLATED: &str = "deflated";
