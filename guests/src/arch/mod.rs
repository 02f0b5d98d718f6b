//! x86-64 machinery: the PVH entry, descriptor tables, traps and single instructions.

pub mod apic;
pub mod apic_oneshot;
pub mod boot;
pub mod cpu;
pub mod ipi;
pub mod smp;
pub mod traps;
pub mod user;
