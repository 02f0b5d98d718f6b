//! VM, vCPU and memory state of hvbench's VMM, split as Firecracker splits `vstate`.

pub(crate) mod ap;
pub(crate) mod memory;
pub(crate) mod vcpu;
pub(crate) mod vcpu_ops;
pub(crate) mod vm;
