//! The device driven the way a guest drives it: registers through `read`/`write`, rings,
//! headers and buffers written into guest memory by hand (not with the crate the device
//! uses), notifications served by its I/O thread, a temporary file as the disk.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use workloads::virtio::{
    DESC_F_NEXT, DESC_F_WRITE, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY,
    REG_STATUS, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use workloads::virtio_blk::{
    CONFIG_CAPACITY, QUEUE_REQUEST, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};

use super::*;
use crate::vstate::memory;

const QUEUE_SIZE: u16 = 64;
const RING: u64 = 0x10_0000;
/// Request headers and status bytes, one 32-byte slot per request.
const HEADERS: u64 = 0x20_0000;
/// Data buffers, 64 KiB apart.
const DATA: u64 = 0x40_0000;
const DISK_BYTES: u64 = 1 << 20;
const DISK_LEN: usize = 1 << 20;
const MIB: u64 = 1 << 20;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

struct TestDriver {
    device: VirtioBlk,
    handle: BlkHandle,
    mem: GuestMemory,
    disk: std::path::PathBuf,
    next_avail: u16,
    next_used: u16,
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

impl TestDriver {
    fn new(direct: bool) -> Self {
        let disk = std::env::temp_dir().join(format!(
            "hvbench-blk-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::File::create(&disk).unwrap();
        f.write_all(&vec![0u8; DISK_LEN]).unwrap();
        drop(f);
        let mem = memory::allocate(16).unwrap();
        let config = DiskConfig {
            path: disk.clone(),
            direct,
        };
        let (device, handle) = match VirtioBlk::new(mem.clone(), &config, "test") {
            Ok(d) => d,
            // tmpfs refuses O_DIRECT: test buffered there.
            Err(_) if direct => return Self::new(false),
            Err(e) => panic!("{e}"),
        };
        let mut d = TestDriver {
            device,
            handle,
            mem,
            disk,
            next_avail: 0,
            next_used: 0,
        };
        d.start();
        d
    }

    fn set(&mut self, offset: u64, value: u32) {
        self.device.write(offset, &value.to_le_bytes());
    }

    fn get(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.device.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn start(&mut self) {
        self.set(REG_STATUS, 0);
        self.next_avail = 0;
        self.next_used = 0;
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(RING))
            .unwrap();
        self.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.set(REG_DRIVER_FEATURES_SEL, 1);
        self.set(REG_DRIVER_FEATURES, 1);
        let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set(REG_STATUS, features_ok);
        assert_eq!(self.get(REG_STATUS), features_ok);
        self.set(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.set(REG_QUEUE_DESC_LOW, u32::try_from(RING).unwrap());
        self.set(REG_QUEUE_DRIVER_LOW, u32::try_from(RING + 0x1000).unwrap());
        self.set(REG_QUEUE_DEVICE_LOW, u32::try_from(RING + 0x2000).unwrap());
        self.set(REG_QUEUE_READY, 1);
        self.set(REG_STATUS, features_ok | STATUS_DRIVER_OK);
    }

    fn write_desc(&self, index: u16, d: [u8; 16]) {
        self.mem
            .write_slice(&d, GuestAddress(RING + 16 * u64::from(index)))
            .unwrap();
    }

    fn header(&self, slot: u16, kind: u32, sector: u64) -> u64 {
        let addr = HEADERS + 32 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        // The status byte, pre-set to a value the device never writes.
        self.mem.write_obj(0xeeu8, GuestAddress(addr + 16)).unwrap();
        addr
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(HEADERS + 32 * u64::from(slot) + 16))
            .unwrap()
    }

    /// A well-formed request in descriptors 3*slot.. with `len` bytes of data at `data`.
    fn request(&self, slot: u16, kind: u32, sector: u64, data: u64, len: u32) -> u16 {
        let header = self.header(slot, kind, sector);
        let first = 3 * slot;
        let write = if kind == T_OUT { 0 } else { DESC_F_WRITE };
        self.write_desc(first, desc(header, 16, DESC_F_NEXT, first + 1));
        self.write_desc(first + 1, desc(data, len, write | DESC_F_NEXT, first + 2));
        self.write_desc(first + 2, desc(header + 16, 1, DESC_F_WRITE, 0));
        first
    }

    /// Offers `heads` in one go and notifies once.
    fn offer(&mut self, heads: &[u16]) {
        let avail = RING + 0x1000;
        for head in heads {
            let slot = self.next_avail % QUEUE_SIZE;
            self.mem
                .write_obj(*head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
        }
        self.mem
            .write_obj(self.next_avail, GuestAddress(avail + 2))
            .unwrap();
        self.set(REG_QUEUE_NOTIFY, QUEUE_REQUEST);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(RING + 0x2000 + 2)).unwrap()
    }

    /// Waits until `count` more buffers are used; their (id, len).
    fn wait_used(&mut self, count: u16) -> Vec<(u32, u32)> {
        let started = Instant::now();
        while self.used_idx().wrapping_sub(self.next_used) < count {
            assert!(started.elapsed() < Duration::from_secs(5), "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..count)
            .map(|_| {
                let at = RING + 0x2000 + 4 + 8 * u64::from(self.next_used % QUEUE_SIZE);
                self.next_used = self.next_used.wrapping_add(1);
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Waits for the device to ask for a reset.
    fn wait_needs_reset(&mut self) {
        let started = Instant::now();
        while self.get(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "no reset asked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.disk).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut out = vec![0u8; len];
        f.read_exact(&mut out).unwrap();
        out
    }

    fn read_back(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let head = self.request(20, T_IN, sector, DATA + 0x10_0000, len);
        self.offer(&[head]);
        assert_eq!(self.wait_used(1), vec![(u32::from(head), len + 1)]);
        assert_eq!(self.status(20), S_OK);
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(DATA + 0x10_0000))
            .unwrap();
        out
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap().wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn writes_reach_the_file_and_read_back_with_flush_and_id() {
    for direct in [false, true] {
        let mut d = TestDriver::new(direct);
        let mut config = [0u8; 8];
        d.device
            .read(workloads::virtio::REG_CONFIG + CONFIG_CAPACITY, &mut config);
        assert_eq!(u64::from_le_bytes(config), DISK_BYTES / 512);
        let data = pattern(8192, 5);
        d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let head = d.request(0, T_OUT, 16, DATA, 8192);
        d.offer(&[head]);
        assert_eq!(d.wait_used(1), vec![(0, 1)]);
        assert_eq!(d.status(0), S_OK);
        assert_eq!(d.disk_bytes(16 * 512, 8192), data);
        assert_eq!(d.read_back(16, 8192), data);

        let flush = d.request(1, T_FLUSH, 0, 0, 0);
        // A flush carries no data: header and status only.
        d.write_desc(flush, desc(HEADERS + 32, 16, DESC_F_NEXT, flush + 2));
        d.offer(&[flush]);
        assert_eq!(d.wait_used(1), vec![(u32::from(flush), 1)]);
        assert_eq!(d.status(1), S_OK);

        let id = d.request(2, T_GET_ID, 0, DATA + 0x8000, 20);
        d.offer(&[id]);
        assert_eq!(d.wait_used(1), vec![(u32::from(id), 21)]);
        let mut got = [0u8; 20];
        d.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x8000))
            .unwrap();
        assert!(got.starts_with(disk::DISK_ID));
        assert_eq!(d.handle.flushes(), 1);
        assert_eq!(d.handle.bytes_written(), 8192);
        assert_eq!(d.handle.refusals().total, 0);
    }
}

#[test]
fn many_requests_in_one_notification_complete_with_their_data() {
    let mut d = TestDriver::new(true);
    for i in 0..16u64 {
        let data = pattern(4096, u8::try_from(i).unwrap());
        d.mem
            .write_slice(&data, GuestAddress(DATA + i * 0x1_0000))
            .unwrap();
    }
    let heads: Vec<u16> = (0..16u16)
        .map(|i| {
            d.request(
                i,
                T_OUT,
                8 * u64::from(i),
                DATA + u64::from(i) * 0x1_0000,
                4096,
            )
        })
        .collect();
    d.offer(&heads);
    let used = d.wait_used(16);
    let mut ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, heads.iter().map(|h| u32::from(*h)).collect::<Vec<_>>());
    for i in 0..16u16 {
        assert_eq!(d.status(i), S_OK);
        let want = pattern(4096, u8::try_from(i).unwrap());
        assert_eq!(d.disk_bytes(u64::from(i) * 4096, 4096), want);
    }
    assert_eq!(d.handle.requests(), 16);
    // Where the kernel has io_uring, the I/O thread hands them all to it at once.
    assert_eq!(d.handle.uses_io_uring(), uring::Uring::new().is_ok());
}

#[test]
fn unaligned_buffers_go_through_a_bounce_buffer_under_o_direct() {
    let mut d = TestDriver::new(true);
    let data = pattern(1536, 3);
    // 512-byte aligned in guest RAM, not 4 KiB: O_DIRECT cannot take it as it is.
    d.mem.write_slice(&data, GuestAddress(DATA + 512)).unwrap();
    let head = d.request(0, T_OUT, 3, DATA + 512, 1536);
    d.offer(&[head]);
    assert_eq!(d.wait_used(1), vec![(0, 1)]);
    assert_eq!(d.status(0), S_OK);
    assert_eq!(d.disk_bytes(3 * 512, 1536), data);
    let head = d.request(1, T_IN, 3, DATA + 0x2_0200, 1536);
    d.offer(&[head]);
    assert_eq!(d.wait_used(1), vec![(u32::from(head), 1537)]);
    let mut back = vec![0u8; 1536];
    d.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x2_0200))
        .unwrap();
    assert_eq!(back, data);
}

/// Each malformed request gets `status`, leaves the disk and RAM alone, and the device
/// serves the next request.
fn refused(d: &mut TestDriver, head: u16, slot: u16, status: u8) {
    let before = d.disk_bytes(0, DISK_LEN);
    let refusals = d.handle.refusals().total;
    d.offer(&[head]);
    assert_eq!(d.wait_used(1), vec![(u32::from(head), 1)]);
    assert_eq!(d.status(slot), status);
    assert_eq!(d.handle.refusals().total, refusals + 1);
    assert_eq!(d.disk_bytes(0, DISK_LEN), before, "the disk changed");
    assert_eq!(d.get(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.read_back(0, 512).len(), 512);
}

#[test]
fn malformed_requests_get_an_error_status_and_the_device_carries_on() {
    let mut d = TestDriver::new(false);
    d.mem
        .write_slice(&pattern(8192, 9), GuestAddress(DATA))
        .unwrap();
    let last_sector = DISK_BYTES / 512;
    // Sectors past the disk, and a sector whose byte offset overflows.
    let h = d.request(0, T_OUT, last_sector - 1, DATA, 1024);
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_IN, u64::MAX / 2, DATA, 512);
    refused(&mut d, h, 0, S_IOERR);
    // A buffer outside guest RAM, and one straddling its end.
    let h = d.request(0, T_OUT, 0, 64 * MIB, 512);
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_IN, 0, 16 * MIB - 256, 512);
    refused(&mut d, h, 0, S_IOERR);
    // A ragged length, an empty one, one over the limit.
    let h = d.request(0, T_OUT, 0, DATA, 100);
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_OUT, 0, DATA, 0);
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_IN, 0, DATA, 2 << 20);
    refused(&mut d, h, 0, S_IOERR);
    // A read into a device-readable buffer; a write from a device-writable one.
    let h = d.request(0, T_IN, 0, DATA, 512);
    d.write_desc(h + 1, desc(DATA, 512, DESC_F_NEXT, h + 2));
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_OUT, 0, DATA, 512);
    d.write_desc(h + 1, desc(DATA, 512, DESC_F_WRITE | DESC_F_NEXT, h + 2));
    refused(&mut d, h, 0, S_IOERR);
    // A header of the wrong size or direction; an unknown type.
    let h = d.request(0, T_OUT, 0, DATA, 512);
    d.write_desc(h, desc(HEADERS, 8, DESC_F_NEXT, h + 1));
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_OUT, 0, DATA, 512);
    d.write_desc(h, desc(HEADERS, 16, DESC_F_WRITE | DESC_F_NEXT, h + 1));
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, 99, 0, DATA, 512);
    refused(&mut d, h, 0, S_UNSUPP);
    // A flush with data; a get-id too short for the id.
    let h = d.request(0, T_FLUSH, 0, DATA, 512);
    refused(&mut d, h, 0, S_IOERR);
    let h = d.request(0, T_GET_ID, 0, DATA, 8);
    refused(&mut d, h, 0, S_IOERR);
    assert!(d
        .handle
        .refusals()
        .kept
        .iter()
        .any(|r| r.contains("past the disk")));
}

#[test]
fn chains_without_a_status_byte_make_the_device_ask_for_a_reset() {
    let mut d = TestDriver::new(false);
    type Case = Box<dyn Fn(&TestDriver) -> u16>;
    let cases: Vec<Case> = vec![
        // One readable descriptor: no status byte at all.
        Box::new(|d| {
            d.write_desc(0, desc(HEADERS, 16, 0, 0));
            0
        }),
        // The status descriptor device-readable.
        Box::new(|d| {
            let h = d.request(0, T_IN, 0, DATA, 512);
            d.write_desc(h + 2, desc(HEADERS + 16, 1, 0, 0));
            h
        }),
        // The status byte outside guest RAM.
        Box::new(|d| {
            let h = d.request(0, T_IN, 0, DATA, 512);
            d.write_desc(h + 2, desc(64 * MIB, 1, DESC_F_WRITE, 0));
            h
        }),
        // A loop: the last descriptor points back to the first.
        Box::new(|d| {
            let h = d.request(0, T_IN, 0, DATA, 512);
            d.write_desc(h + 2, desc(HEADERS + 16, 1, DESC_F_WRITE | DESC_F_NEXT, h));
            h
        }),
        // A next index outside the queue.
        Box::new(|d| {
            let h = d.request(0, T_IN, 0, DATA, 512);
            d.write_desc(
                h + 1,
                desc(DATA, 512, DESC_F_WRITE | DESC_F_NEXT, QUEUE_SIZE + 5),
            );
            h
        }),
        // A head index outside the queue.
        Box::new(|_| QUEUE_SIZE + 1),
    ];
    for (i, case) in cases.iter().enumerate() {
        let ram_before = {
            let mut v = vec![0u8; 0x1_0000];
            d.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
            v
        };
        let head = case(&d);
        d.offer(&[head]);
        d.wait_needs_reset();
        // Nothing more is served until the reset.
        let h = d.request(1, T_IN, 0, DATA + 0x8000, 512);
        d.offer(&[h]);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.status(1), 0xee, "case {i}: served while it needs a reset");
        let mut after = vec![0u8; 0x1_0000];
        d.mem.read_slice(&mut after, GuestAddress(DATA)).unwrap();
        assert_eq!(after, ram_before, "case {i}: guest RAM changed");
        d.start();
        assert_eq!(
            d.read_back(0, 512).len(),
            512,
            "case {i}: works after a reset"
        );
    }
    assert_eq!(d.handle.refusals().total, 6);
}

#[test]
fn a_disk_that_cannot_be_opened_is_an_error() {
    let mem = memory::allocate(16).unwrap();
    let config = DiskConfig {
        path: "/nonexistent/hvbench-disk".into(),
        direct: false,
    };
    assert!(matches!(
        VirtioBlk::new(mem, &config, "test"),
        Err(BlkError::Open { .. })
    ));
}

#[test]
fn an_available_index_that_jumps_past_the_queue_makes_the_device_ask_for_a_reset() {
    let mut d = TestDriver::new(false);
    // The driver claims 300 new requests on a queue of 64 entries.
    d.mem
        .write_obj(300u16, GuestAddress(RING + 0x1000 + 2))
        .unwrap();
    d.set(REG_QUEUE_NOTIFY, QUEUE_REQUEST);
    d.wait_needs_reset();
    assert_eq!(d.used_idx(), 0, "nothing was served");
    assert!(d.handle.refusals().total >= 1);
    d.start();
    assert_eq!(d.read_back(0, 4096).len(), 4096);
}

#[test]
fn notifying_a_queue_that_is_not_set_up_serves_nothing() {
    let mut d = TestDriver::new(false);
    d.set(REG_STATUS, 0);
    let head = d.request(0, T_IN, 0, DATA, 512);
    d.offer(&[head]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 0);
    assert_eq!(d.status(0), 0xee);
    assert_eq!(d.handle.refusals().total, 0);
}

/// A migration's pause: requests made available meanwhile wait (none is lost or run
/// twice); a resume serves them; the saved state restores a device over the same disk
/// that goes on where the ring left off, and another disk is refused.
#[test]
fn a_paused_device_serves_nothing_and_its_state_goes_on_elsewhere() {
    let mut d = TestDriver::new(false);
    let data = pattern(4096, 9);
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let saved = d.device.pause(Duration::from_secs(2)).unwrap();
    let head = d.request(0, T_OUT, 0, DATA, 4096);
    d.offer(&[head]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 0, "served while paused");
    d.device.resume();
    assert_eq!(d.wait_used(1), vec![(0, 1)]);
    assert_eq!(d.disk_bytes(0, 4096), data);

    let saved_after = d.device.pause(Duration::from_secs(2)).unwrap();
    assert_ne!(saved, saved_after, "the queue moved on");
    let config = DiskConfig {
        path: d.disk.clone(),
        direct: false,
    };
    let (device, handle) =
        VirtioBlk::restore(d.mem.clone(), &config, "test", &saved_after).unwrap();
    d.device = device;
    d.handle = handle;
    // Restored paused (the source may still run the guest) until resumed.
    let head = d.request(5, T_IN, 0, DATA + 0x20_0000, 4096);
    d.offer(&[head]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 1, "served before the guest ran here");
    d.device.resume();
    assert_eq!(d.wait_used(1), vec![(u32::from(head), 4097)]);
    assert_eq!(d.read_back(0, 4096), data);
    assert_eq!(d.used_idx(), 3);

    let other = DiskConfig {
        path: d.disk.with_extension("other"),
        direct: false,
    };
    let refused = VirtioBlk::restore(d.mem.clone(), &other, "test", &saved_after).err();
    assert!(refused.is_some_and(|e| e.contains("at the source")));
    VirtioBlk::restore(d.mem.clone(), &config, "test", &saved_after[..40]).unwrap_err();
}
