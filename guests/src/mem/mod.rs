//! The guest's memory: where workloads get physical memory, and the 4 KiB mappings they
//! build over it. The boot page tables identity-map the low 4 GiB with 2 MiB pages, so
//! a physical address below 4 GiB is also a virtual address with a 2 MiB mapping.

pub mod arena;
pub mod paging;
