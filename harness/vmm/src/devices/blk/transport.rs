//! The virtio-mmio (version 2) registers of the virtio-blk: identification, feature
//! negotiation, the one queue's set-up, status and the configuration space (capacity,
//! size_max, seg_max, blk_size). Registers are whole aligned 32-bit words; anything else
//! reads as zero and is ignored when written, as the balloon does.

use virtio_queue::{Queue, QueueT};
use workloads::virtio::{
    FEATURE_VERSION_1_BIT, FEATURE_VERSION_1_WORD, MAGIC, REG_CONFIG, REG_CONFIG_GENERATION,
    REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_MAGIC,
    REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM,
    REG_QUEUE_NUM_MAX, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS, REG_VENDOR_ID, REG_VERSION,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VENDOR_ID, VERSION,
};
use workloads::virtio_blk::{
    CONFIG_BLK_SIZE, CONFIG_CAPACITY, CONFIG_LEN, CONFIG_SEG_MAX, CONFIG_SIZE_MAX, DEVICE_ID_BLOCK,
    F_BLK_SIZE, F_FLUSH, F_SEG_MAX, F_SIZE_MAX, MAX_REQUEST_BYTES, QUEUE_REQUEST, SEG_MAX,
};

use crate::cast::u64_to_usize;

/// The block size the device reports (`blk_size`).
const BLOCK_SIZE: u32 = 4096;

/// What a register write asks of the device besides changing a register.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    /// The driver wrote 0 to Status: the device and its queue were reset.
    Reset,
    /// The driver notified the request queue.
    Notify,
}

#[derive(Debug)]
pub(crate) struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: [u32; 2],
    queue_sel: u32,
    capacity: u64,
}

impl Registers {
    pub(crate) fn new(capacity_sectors: u64) -> Self {
        Registers {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: [0; 2],
            queue_sel: 0,
            capacity: capacity_sectors,
        }
    }

    pub(crate) fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn device_features(word: u32) -> u32 {
        match word {
            0 => F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH,
            FEATURE_VERSION_1_WORD => FEATURE_VERSION_1_BIT,
            _ => 0,
        }
    }

    fn config(&self) -> [u8; u64_to_usize(CONFIG_LEN)] {
        let mut c = [0u8; u64_to_usize(CONFIG_LEN)];
        let at = |o: u64| u64_to_usize(o);
        c[at(CONFIG_CAPACITY)..][..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[at(CONFIG_SIZE_MAX)..][..4].copy_from_slice(&MAX_REQUEST_BYTES.to_le_bytes());
        c[at(CONFIG_SEG_MAX)..][..4].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[at(CONFIG_BLK_SIZE)..][..4].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        c
    }

    fn selected(&self) -> bool {
        self.queue_sel == QUEUE_REQUEST
    }

    pub(crate) fn read(&self, offset: u64, data: &mut [u8], needs_reset: bool, queue: &Queue) {
        if offset >= REG_CONFIG {
            let config = self.config();
            for (i, b) in data.iter_mut().enumerate() {
                let at = (offset - REG_CONFIG).saturating_add(i as u64);
                *b = config.get(u64_to_usize(at)).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => DEVICE_ID_BLOCK,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => Self::device_features(self.device_features_sel),
            REG_QUEUE_NUM_MAX if self.selected() => u32::from(queue.max_size()),
            REG_QUEUE_READY if self.selected() => u32::from(queue.ready()),
            REG_INTERRUPT_STATUS => 0,
            REG_STATUS if needs_reset => self.status | STATUS_DEVICE_NEEDS_RESET,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8], queue: &mut Queue) -> Effect {
        if offset >= REG_CONFIG || data.len() != 4 || !offset.is_multiple_of(4) {
            return Effect::None;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if !self.driver_ok() => {
                if let Some(w) = self
                    .driver_features
                    .get_mut(self.driver_features_sel as usize)
                {
                    *w = value;
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_INTERRUPT_ACK => {}
            REG_STATUS if value == 0 => {
                *self = Registers::new(self.capacity);
                queue.reset();
                return Effect::Reset;
            }
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NOTIFY if value == QUEUE_REQUEST => return Effect::Notify,
            _ if self.driver_ok() || !self.selected() => {}
            _ => configure_queue(queue, offset, value),
        }
        Effect::None
    }

    fn set_status(&mut self, value: u32) {
        let mut value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let subset = (0..2u32)
                .all(|w| self.driver_features[w as usize] & !Self::device_features(w) == 0);
            let modern =
                self.driver_features[FEATURE_VERSION_1_WORD as usize] & FEATURE_VERSION_1_BIT != 0;
            if !(subset && modern) {
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            value &= !STATUS_DRIVER_OK;
        }
        self.status = value;
    }
}

fn configure_queue(q: &mut Queue, offset: u64, value: u32) {
    if q.ready() && offset != REG_QUEUE_READY {
        return;
    }
    match offset {
        // The crate keeps the old value when a size or address is invalid; an invalid
        // set-up then fails `is_valid` at the first notification.
        REG_QUEUE_NUM => q.set_size(u16::try_from(value).unwrap_or(u16::MAX)),
        REG_QUEUE_READY => q.set_ready(value == 1),
        REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
        REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
        REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
        REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
        REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
        _ => {}
    }
}
