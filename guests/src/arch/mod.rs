//! x86-64 machinery: the PVH entry, descriptor tables, traps and single instructions.

pub mod boot;
pub mod cpu;
pub mod traps;
pub mod user;
