//! VM, vCPU and memory state of hvbench's VMM, split as Firecracker splits `vstate`.

pub mod memory;
pub mod vcpu;
pub mod vm;
