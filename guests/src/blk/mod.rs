//! One request interface over the guest's block drivers: the workloads queue reads, writes
//! and flushes by tag, kick the device, and poll for completions. Completions are found by
//! polling (the guest takes no interrupts), so a completion's time is when the driver saw
//! it. Two drivers implement it: virtio-blk (hvbench's VMM, QEMU) and blkfront (Xen).

pub mod virtio;
pub mod xen;

/// Tags any driver offers at most (the workloads size their bookkeeping by it).
pub const MAX_SLOTS: u16 = 64;

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

/// A finished request: its tag and whether the device says it succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u16,
    /// The device's status byte (0: success).
    pub status: u8,
}

/// Why a request could not be queued or the device not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The tag is beyond the driver's slots, or already in flight.
    BadTag,
    /// The request does not fit the device (past its end, not whole sectors, too large).
    OutOfRange,
    /// The device does not offer flush.
    NoFlush,
}

impl BlkError {
    pub fn message(self) -> &'static str {
        match self {
            BlkError::BadTag => "a block request's tag is out of range or already in flight",
            BlkError::OutOfRange => "a block request lies outside the disk or is malformed",
            BlkError::NoFlush => "the block device does not offer flush",
        }
    }
}

/// A block device the workloads drive.
pub trait BlockDevice {
    /// The disk's size in bytes.
    fn capacity(&self) -> u64;
    /// Tags usable at once (0..this).
    fn slots(&self) -> u16;
    /// Queues a request of `len` bytes at byte `offset` of the disk, to or from the
    /// identity-mapped buffer at `buf`; the device sees it at the next [`kick`].
    ///
    /// [`kick`]: BlockDevice::kick
    fn queue(&mut self, tag: u16, op: Op, offset: u64, buf: u64, len: u32) -> Result<(), BlkError>;
    /// Tells the device about every request queued since the last kick.
    fn kick(&mut self);
    /// The next finished request, if one has finished.
    fn poll(&mut self) -> Option<Completion>;
    /// Whether the device asked to be reset (it refused a request it could not answer).
    fn needs_reset(&self) -> bool;
}

/// The block device of this hypervisor (one per workload, on the stack: the guest has no
/// heap to box blkfront's bookkeeping in).
#[allow(clippy::large_enum_variant)]
pub enum Device {
    Virtio(virtio::VirtioBlk),
    Xen(xen::XenBlk),
}

/// Finds a block device: blkfront on Xen, else hvbench's VMM's or QEMU's virtio-blk.
pub fn find() -> Result<Device, &'static str> {
    if crate::hypervisor::xen::is_ready() {
        xen::XenBlk::open().map(Device::Xen)
    } else {
        virtio::VirtioBlk::init().map(Device::Virtio)
    }
}

impl Device {
    fn inner(&mut self) -> &mut dyn BlockDevice {
        match self {
            Device::Virtio(d) => d,
            Device::Xen(d) => d,
        }
    }

    fn inner_ref(&self) -> &dyn BlockDevice {
        match self {
            Device::Virtio(d) => d,
            Device::Xen(d) => d,
        }
    }
}

impl BlockDevice for Device {
    fn capacity(&self) -> u64 {
        self.inner_ref().capacity()
    }
    fn slots(&self) -> u16 {
        self.inner_ref().slots()
    }
    fn queue(&mut self, tag: u16, op: Op, offset: u64, buf: u64, len: u32) -> Result<(), BlkError> {
        self.inner().queue(tag, op, offset, buf, len)
    }
    fn kick(&mut self) {
        self.inner().kick()
    }
    fn poll(&mut self) -> Option<Completion> {
        self.inner().poll()
    }
    fn needs_reset(&self) -> bool {
        self.inner_ref().needs_reset()
    }
}
