//! The virtio block device (virtio 1.2, section 5.2) as hvbench's guest driver and VMM use
//! it: its feature bits, configuration layout, request header and statuses, and where
//! hvbench's VMM puts it. The transport registers are [`crate::virtio`]'s.

use crate::abi::{VIRTIO_BALLOON_BASE, VIRTIO_BALLOON_LEN};

/// Device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// hvbench's VMM puts its virtio-blk (virtio-mmio, version 2) in the page after the
/// balloon's, in the range the guest maps uncached and user-accessible.
pub const VIRTIO_BLK_BASE: u64 = VIRTIO_BALLOON_BASE + VIRTIO_BALLOON_LEN;
pub const VIRTIO_BLK_LEN: u64 = 0x1000;

/// QEMU's microvm places its virtio-mmio transports from here, 512 bytes apart (one per
/// `-device virtio-*-device`, in the order given): the guest probes these too.
pub const MICROVM_VIRTIO_BASE: u64 = 0xfeb0_0000;
pub const MICROVM_VIRTIO_STRIDE: u64 = 0x200;
pub const MICROVM_VIRTIO_SLOTS: u64 = 24;

/// The one request queue.
pub const QUEUE_REQUEST: u32 = 0;

/// Sectors are always 512 bytes, whatever the device's block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Feature bits (word 0).
pub const F_SIZE_MAX: u32 = 1 << 1;
pub const F_SEG_MAX: u32 = 1 << 2;
pub const F_RO: u32 = 1 << 5;
pub const F_BLK_SIZE: u32 = 1 << 6;
pub const F_FLUSH: u32 = 1 << 9;

/// Configuration space (little-endian): capacity in sectors, the largest segment, the most
/// segments per request, and the block size.
pub const CONFIG_CAPACITY: u64 = 0;
pub const CONFIG_SIZE_MAX: u64 = 8;
pub const CONFIG_SEG_MAX: u64 = 12;
pub const CONFIG_BLK_SIZE: u64 = 20;
pub const CONFIG_LEN: u64 = 24;

/// Request types (the header's first word).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Bytes of the request header: type, reserved, sector.
pub const HEADER_LEN: u32 = 16;
/// Bytes of the identification string `GET_ID` returns.
pub const ID_LEN: u32 = 20;

/// Status byte values the device writes last.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Largest request hvbench's guest sends (the 1 MiB sequential workloads), and what
/// hvbench's VMM offers as `size_max` (per segment) and accepts per request.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Segments per request hvbench's VMM offers (`seg_max`).
pub const SEG_MAX: u32 = 128;
