//! Kernel state shared with user mode. The guest has one vCPU and no preemption, so a
//! value is never accessed from two places at once; `Global` states that once.

use core::cell::UnsafeCell;

pub struct Global<T>(UnsafeCell<T>);

// SAFETY: one vCPU, no interrupts, no threads: accesses never overlap.
unsafe impl<T> Sync for Global<T> {}

impl<T: Copy> Global<T> {
    pub const fn new(value: T) -> Self {
        Global(UnsafeCell::new(value))
    }

    pub fn get(&self) -> T {
        // SAFETY: see the `Sync` impl: no write is in progress while this reads.
        unsafe { *self.0.get() }
    }

    pub fn set(&self, value: T) {
        // SAFETY: see the `Sync` impl: no other reference is live while this writes.
        unsafe { *self.0.get() = value }
    }
}
