//! The virtio-mmio transport (version 2, "modern") and the balloon device, as the virtio 1.2
//! specification defines them (sections 2.7 split virtqueues, 4.2.2 MMIO registers, 5.5
//! memory balloon). The guest's driver and hvbench's VMM both use these numbers.

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `Version` of the modern (non-legacy) MMIO transport.
pub const VERSION: u32 = 2;
/// Device ID of the traditional memory balloon.
pub const DEVICE_ID_BALLOON: u32 = 5;
/// Vendor ID hvbench's VMM reports ("HVB\0").
pub const VENDOR_ID: u32 = 0x0042_5648;

/// Register offsets of the MMIO transport. Registers are 32 bits wide and must be accessed
/// as whole, aligned words; the configuration space from [`REG_CONFIG`] is byte-addressed.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits (`Status` register).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
/// Set by the device when it met an error it cannot recover from; the driver must reset it.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// `VIRTIO_F_VERSION_1`: feature bit 32, i.e. bit 0 of feature word 1. A modern device
/// offers it and a modern driver must accept it.
pub const FEATURE_VERSION_1_WORD: u32 = 1;
pub const FEATURE_VERSION_1_BIT: u32 = 1 << 0;

/// Balloon queues: the driver hands pages over on the first and takes them back on the
/// second (no statistics or free-page queues are offered).
pub const QUEUE_INFLATE: u32 = 0;
pub const QUEUE_DEFLATE: u32 = 1;
pub const BALLOON_QUEUES: usize = 2;
/// The largest queue the device offers (`QueueNumMax`).
pub const QUEUE_SIZE_MAX: u16 = 256;

/// Balloon configuration space (little-endian): the host's target, in 4 KiB pages, and the
/// number of pages the driver has handed over.
pub const CONFIG_NUM_PAGES: u64 = 0;
pub const CONFIG_ACTUAL: u64 = 4;
pub const CONFIG_LEN: u64 = 8;

/// Balloon page frame numbers are 32-bit and always count 4 KiB pages, whatever the guest's
/// page size (VIRTIO_BALLOON_PFN_SHIFT).
pub const BALLOON_PFN_SHIFT: u32 = 12;
/// PFNs per buffer the guest sends: Linux's driver sends 256 (1 MiB) per transfer, and
/// hvbench's guest does the same on KVM and on Xen, so both hand memory back in 1 MiB steps.
pub const PFNS_PER_BUFFER: usize = 256;

/// Split-virtqueue descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Sizes of the split virtqueue's three areas for a queue of `size` entries.
pub const fn desc_table_bytes(size: u16) -> u64 {
    16 * size as u64
}
pub const fn avail_ring_bytes(size: u16) -> u64 {
    6 + 2 * size as u64
}
pub const fn used_ring_bytes(size: u16) -> u64 {
    6 + 8 * size as u64
}
