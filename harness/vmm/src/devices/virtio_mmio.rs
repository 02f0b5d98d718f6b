//! The virtio-mmio (version 2) transport registers, one implementation for every device
//! (the balloon and the virtio-blk): identification, feature negotiation, queue
//! selection and set-up, status, and the configuration space's bounds. A device keeps
//! its queues and its configuration space; this keeps the rest, and tells the device
//! what a write asks of it ([`Effect`]).
//!
//! Registers are whole, aligned 32-bit words; anything else reads as zero and is ignored
//! when written. A queue's set-up and the driver's features are frozen once the driver
//! is running (DRIVER_OK), and a queue's set-up once it is ready. There is no interrupt
//! to raise (the drivers poll), so InterruptStatus reads as zero.
//!
//! The state ([`Transport::encode`]) travels in a migration with each queue's
//! ([`encode_queue`]).

use virtio_queue::{Queue, QueueState, QueueT};
use workloads::virtio::{
    FEATURE_VERSION_1_BIT, FEATURE_VERSION_1_WORD, MAGIC, REG_CONFIG, REG_CONFIG_GENERATION,
    REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DEVICE_ID, REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL, REG_MAGIC, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS,
    REG_VENDOR_ID, REG_VERSION, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VENDOR_ID, VERSION,
};

use crate::cast::u64_to_usize;

/// What a register write asks of the device besides changing a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    /// The driver wrote 0 to Status: the transport and every queue were reset; the
    /// device resets its own state.
    Reset,
    /// The driver notified this queue (any value: the device checks it).
    Notify(u32),
}

/// The transport's registers for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transport {
    device_id: u32,
    /// The features offered, words 0 and 1 (VERSION_1 is always added).
    features: [u32; 2],
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: [u32; 2],
    queue_sel: u32,
}

/// Bytes of [`Transport::encode`].
pub(crate) const TRANSPORT_BYTES: usize = 6 * 4;
/// Bytes of [`encode_queue`].
pub(crate) const QUEUE_BYTES: usize = 40;

impl Transport {
    pub(crate) fn new(device_id: u32, features_word0: u32) -> Self {
        let mut features = [features_word0, 0];
        features[FEATURE_VERSION_1_WORD as usize] |= FEATURE_VERSION_1_BIT;
        Transport {
            device_id,
            features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: [0; 2],
            queue_sel: 0,
        }
    }

    pub(crate) fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn offered(&self, word: u32) -> u32 {
        self.features.get(word as usize).copied().unwrap_or(0)
    }

    /// A read below the configuration space; `needs_reset` adds DEVICE_NEEDS_RESET to the
    /// status, `generation` is the configuration generation.
    pub(crate) fn read(
        &self,
        offset: u64,
        data: &mut [u8],
        queues: &[Queue],
        needs_reset: bool,
        generation: u32,
    ) {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let queue = queues.get(self.queue_sel as usize);
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_id,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => self.offered(self.device_features_sel),
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_STATUS if needs_reset => self.status | STATUS_DEVICE_NEEDS_RESET,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write below the configuration space.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8], queues: &mut [Queue]) -> Effect {
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
            REG_STATUS if value == 0 => {
                *self = Transport::new(self.device_id, self.features[0]);
                queues.iter_mut().for_each(QueueT::reset);
                return Effect::Reset;
            }
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NOTIFY => return Effect::Notify(value),
            _ if self.driver_ok() => {}
            _ => {
                if let Some(q) = queues.get_mut(self.queue_sel as usize) {
                    configure_queue(q, offset, value);
                }
            }
        }
        Effect::None
    }

    fn set_status(&mut self, value: u32) {
        let mut value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // FEATURES_OK only sticks for a subset of the offered features with VERSION_1.
            let subset =
                (0..2u32).all(|w| self.driver_features[w as usize] & !self.offered(w) == 0);
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

    /// The registers the driver set, for a migration.
    pub(crate) fn encode(&self) -> [u8; TRANSPORT_BYTES] {
        let words = [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.driver_features[0],
            self.driver_features[1],
            self.queue_sel,
        ];
        let mut out = [0u8; TRANSPORT_BYTES];
        for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// A transport for `device_id` with the registers `bytes` (from [`Transport::encode`])
    /// hold; the status is taken as the driver wrote it, so a stream cannot set more
    /// than a driver could.
    pub(crate) fn decode(
        device_id: u32,
        features_word0: u32,
        bytes: &[u8],
    ) -> Result<Self, String> {
        if bytes.len() != TRANSPORT_BYTES {
            return Err(format!("transport state of {} bytes", bytes.len()));
        }
        let w = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
        let mut t = Transport::new(device_id, features_word0);
        t.device_features_sel = w(1);
        t.driver_features_sel = w(2);
        t.driver_features = [w(3), w(4)];
        t.queue_sel = w(5);
        // FEATURES_OK first (checked against the features), then the rest.
        t.set_status(w(0) & !STATUS_DRIVER_OK);
        t.set_status(w(0));
        if t.status != w(0) & !STATUS_DEVICE_NEEDS_RESET {
            return Err(format!("status {:#x} is not one a driver can reach", w(0)));
        }
        Ok(t)
    }
}

/// Reads the configuration space `config` at `offset` (from the page's start, at or past
/// `REG_CONFIG`): bytes past its end read as zero.
pub(crate) fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = (offset - REG_CONFIG).saturating_add(i as u64);
        *b = config.get(u64_to_usize(at)).copied().unwrap_or(0);
    }
}

fn configure_queue(q: &mut Queue, offset: u64, value: u32) {
    if q.ready() && offset != REG_QUEUE_READY {
        return;
    }
    match offset {
        // The crate keeps the old value (and logs) when a size or address is invalid; an
        // invalid set-up then fails `is_valid` at the first notification.
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

/// A queue's state as it travels: max size, next avail, next used, size, ready, event
/// index (u16 each, padded to 12 bytes), then the three ring addresses (u64 each),
/// then 4 zero bytes.
pub(crate) fn encode_queue(q: &Queue) -> [u8; QUEUE_BYTES] {
    let s = q.state();
    let mut out = [0u8; QUEUE_BYTES];
    let halves = [
        s.max_size,
        s.next_avail,
        s.next_used,
        s.size,
        u16::from(s.ready),
        u16::from(s.event_idx_enabled),
    ];
    for (chunk, h) in out[..12].chunks_exact_mut(2).zip(halves) {
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    for (i, a) in [s.desc_table, s.avail_ring, s.used_ring]
        .into_iter()
        .enumerate()
    {
        out[12 + 8 * i..20 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    out
}

/// A queue from [`encode_queue`]'s bytes; its maximum size must be `max_size` (the
/// device's), and virtio-queue checks the size and the rings' alignment.
pub(crate) fn decode_queue(bytes: &[u8], max_size: u16) -> Result<Queue, String> {
    if bytes.len() != QUEUE_BYTES {
        return Err(format!("queue state of {} bytes", bytes.len()));
    }
    let h = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
    let a =
        |i: usize| u64::from_le_bytes(bytes[12 + 8 * i..20 + 8 * i].try_into().unwrap_or([0; 8]));
    if h(0) != max_size || h(4) > 1 || h(5) > 1 {
        return Err(format!(
            "queue state: max size {}, ready {}, event index {}",
            h(0),
            h(4),
            h(5)
        ));
    }
    let state = QueueState {
        max_size: h(0),
        next_avail: h(1),
        next_used: h(2),
        size: h(3),
        ready: h(4) == 1,
        event_idx_enabled: h(5) == 1,
        desc_table: a(0),
        avail_ring: a(1),
        used_ring: a(2),
    };
    Queue::try_from(state).map_err(|e| format!("queue state: {e}"))
}

#[cfg(test)]
mod tests {
    use workloads::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};

    use super::*;

    fn word(t: &Transport, offset: u64, queues: &[Queue]) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b, queues, false, 0);
        u32::from_le_bytes(b)
    }

    fn set(t: &mut Transport, offset: u64, value: u32, queues: &mut [Queue]) -> Effect {
        t.write(offset, &value.to_le_bytes(), queues)
    }

    #[test]
    fn registers_and_queues_survive_a_migration_and_garbage_is_refused() {
        let mut queues = [Queue::new(256).unwrap(), Queue::new(256).unwrap()];
        let mut t = Transport::new(5, 0);
        set(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            &mut queues,
        );
        set(&mut t, REG_DRIVER_FEATURES_SEL, 1, &mut queues);
        set(&mut t, REG_DRIVER_FEATURES, 1, &mut queues);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        set(&mut t, REG_STATUS, ok, &mut queues);
        set(&mut t, REG_QUEUE_SEL, 1, &mut queues);
        set(&mut t, REG_QUEUE_NUM, 16, &mut queues);
        set(&mut t, REG_QUEUE_DESC_LOW, 0x10_0000, &mut queues);
        set(&mut t, REG_QUEUE_READY, 1, &mut queues);
        set(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK, &mut queues);
        assert_eq!(word(&t, REG_STATUS, &queues), ok | STATUS_DRIVER_OK);
        assert_eq!(
            set(&mut t, REG_QUEUE_NOTIFY, 1, &mut queues),
            Effect::Notify(1)
        );
        queues[1].set_next_avail(3);

        let back = Transport::decode(5, 0, &t.encode()).unwrap();
        assert_eq!(back, t);
        let q = decode_queue(&encode_queue(&queues[1]), 256).unwrap();
        assert_eq!(q.state(), queues[1].state());

        // A status no driver reaches (DRIVER_OK without the features), a wrong length,
        // a queue of another device or with an odd size: refused.
        let mut lying = t.encode();
        lying[..4].copy_from_slice(&(STATUS_DRIVER_OK | STATUS_FEATURES_OK).to_le_bytes());
        lying[16..20].copy_from_slice(&0u32.to_le_bytes());
        Transport::decode(5, 0, &lying).unwrap_err();
        Transport::decode(5, 0, &t.encode()[1..]).unwrap_err();
        decode_queue(&encode_queue(&queues[1]), 128).unwrap_err();
        let mut odd = encode_queue(&queues[1]);
        odd[6..8].copy_from_slice(&15u16.to_le_bytes());
        decode_queue(&odd, 256).unwrap_err();

        assert_eq!(set(&mut t, REG_STATUS, 0, &mut queues), Effect::Reset);
        assert!(!queues[1].ready());
        assert_eq!(word(&t, REG_STATUS, &queues), 0);
    }
}
