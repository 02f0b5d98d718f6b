//! The result-line protocol: what the guest prints on its console, and how the harness
//! reads it back.
//!
//! ```text
//! @hvb1 sample w=cpu.cpuid m=latency n=0 ops=4096 cycles=14680064 ~1a2b3c4d
//! ```
//!
//! One line per event, ASCII, at most [`MAX_LINE`] bytes. Fields are `key=value`; values
//! are printable ASCII with space, `%`, `=` and `~` percent-encoded. The line ends with
//! ` ~` and the CRC-32 of everything before it, so a line damaged on the way (a console
//! that drops bytes, a guest that scribbles) is detected rather than believed. Lines
//! without the prefix are console noise: kept in the log, never parsed.

use crate::crc32::crc32;

/// Every protocol line starts with this.
pub const PREFIX: &str = "@hvb1 ";
/// Protocol version carried in the `hello` line.
pub const VERSION: u32 = 1;
/// Longest line, newline excluded. Longer lines are rejected whole.
pub const MAX_LINE: usize = 512;
/// Room kept at the end of a line for ` ~xxxxxxxx`.
const TRAILER_LEN: usize = 10;

/// A workload's (or a whole run's) outcome. Ordered as XTF orders results: combining
/// outcomes keeps the worst, so a status only ratchets upwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Status {
    Success,
    Skip,
    Error,
    Failure,
    /// The guest stopped answering within the workload's time limit (inferred by the host).
    Timeout,
    /// The guest took an exception or triple-faulted (reported by it, or inferred by the host).
    Crash,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Success,
        Status::Skip,
        Status::Error,
        Status::Failure,
        Status::Timeout,
        Status::Crash,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Skip => "skip",
            Status::Error => "error",
            Status::Failure => "failure",
            Status::Timeout => "timeout",
            Status::Crash => "crash",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The worse of two outcomes.
    pub fn ratchet(self, other: Status) -> Status {
        if other > self {
            other
        } else {
            self
        }
    }
}

/// The kinds of line the guest prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LineKind {
    /// First line: protocol version, hypervisor, CPU vendor, TSC frequency.
    Hello,
    /// A workload begins; a crash or hang after it is charged to this workload.
    Start,
    /// One sample of one metric.
    Sample,
    /// The workload cannot run here; `reason` says why.
    Skip,
    /// A workload's outcome.
    Result,
    /// A named value beside the samples (a checksum, a mode).
    Note,
    /// The guest took an exception it cannot recover from.
    Crash,
    /// Last line: the run's status.
    End,
}

impl LineKind {
    const ALL: [LineKind; 8] = [
        LineKind::Hello,
        LineKind::Start,
        LineKind::Sample,
        LineKind::Skip,
        LineKind::Result,
        LineKind::Note,
        LineKind::Crash,
        LineKind::End,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LineKind::Hello => "hello",
            LineKind::Start => "start",
            LineKind::Sample => "sample",
            LineKind::Skip => "skip",
            LineKind::Result => "result",
            LineKind::Note => "note",
            LineKind::Crash => "crash",
            LineKind::End => "end",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

fn is_plain_value_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'%' | b'=' | b'~')
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// Builds one protocol line in a fixed buffer (guest side: no allocation).
pub struct LineBuilder {
    buf: [u8; MAX_LINE + 1],
    len: usize,
}

/// Shows the line built so far, not the whole buffer.
impl core::fmt::Debug for LineBuilder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LineBuilder")
            .field(
                "line",
                &format_args!("{}", self.buf[..self.len].escape_ascii()),
            )
            .finish()
    }
}

impl LineBuilder {
    pub fn new(kind: LineKind) -> Self {
        let mut b = LineBuilder {
            buf: [0; MAX_LINE + 1],
            len: 0,
        };
        b.push_bytes(PREFIX.as_bytes());
        b.push_bytes(kind.name().as_bytes());
        b
    }

    fn room(&self) -> usize {
        MAX_LINE - TRAILER_LEN - self.len
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.room());
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn key(&mut self, key: &str) -> bool {
        debug_assert!(!key.is_empty() && key.bytes().all(is_key_byte));
        // A key that does not fit whole is dropped with its value; the host then reports
        // the missing field rather than a wrong one.
        if key.len() + 2 > self.room() {
            return false;
        }
        self.push_bytes(b" ");
        self.push_bytes(key.as_bytes());
        self.push_bytes(b"=");
        true
    }

    /// Adds `key=value`, percent-encoding the value; a value too long for the line is cut.
    pub fn text(&mut self, key: &str, value: &str) -> &mut Self {
        if self.key(key) {
            for &b in value.as_bytes() {
                if is_plain_value_byte(b) {
                    if self.room() < 1 {
                        break;
                    }
                    self.push_bytes(&[b]);
                } else {
                    if self.room() < 3 {
                        break;
                    }
                    let hex = b"0123456789ABCDEF";
                    self.push_bytes(&[b'%', hex[(b >> 4) as usize], hex[(b & 15) as usize]]);
                }
            }
        }
        self
    }

    /// Adds `key=<decimal>`.
    pub fn num(&mut self, key: &str, value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = value;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if self.key(key) && self.room() >= digits.len() - i {
            self.push_bytes(&digits[i..]);
        }
        self
    }

    /// Adds `key=0x<hex>`.
    pub fn hex(&mut self, key: &str, value: u64) -> &mut Self {
        let mut digits = [0u8; 18];
        let hex = b"0123456789abcdef";
        digits[0] = b'0';
        digits[1] = b'x';
        for (i, d) in digits[2..].iter_mut().enumerate() {
            *d = hex[((value >> (60 - 4 * i)) & 15) as usize];
        }
        if self.key(key) && self.room() >= digits.len() {
            self.push_bytes(&digits);
        }
        self
    }

    /// Appends the checksum and the newline and returns the finished line.
    pub fn finish(&mut self) -> &[u8] {
        let crc = crc32(&self.buf[..self.len]);
        let hex = b"0123456789abcdef";
        let mut trailer = [0u8; TRAILER_LEN + 1];
        trailer[0] = b' ';
        trailer[1] = b'~';
        for i in 0..8 {
            trailer[2 + i] = hex[((crc >> (28 - 4 * i)) & 15) as usize];
        }
        trailer[TRAILER_LEN] = b'\n';
        self.buf[self.len..self.len + TRAILER_LEN + 1].copy_from_slice(&trailer);
        &self.buf[..self.len + TRAILER_LEN + 1]
    }
}

#[cfg(feature = "std")]
pub use decode::*;

#[cfg(feature = "std")]
mod decode {
    use super::*;
    use crate::table::{Hypervisor, WorkloadId};
    use std::string::{String, ToString};
    use std::vec::Vec;

    /// Why a protocol line was rejected.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum ProtocolError {
        TooLong(usize),
        NotAscii,
        MissingChecksum,
        BadChecksum {
            expected: u32,
            found: String,
        },
        UnknownKind(String),
        MalformedField(String),
        DuplicateField(String),
        MissingField(&'static str),
        BadValue {
            key: &'static str,
            value: String,
        },
        UnknownWorkload(String),
        UnknownMetric {
            workload: &'static str,
            metric: String,
        },
    }

    impl core::fmt::Display for ProtocolError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                ProtocolError::TooLong(n) => {
                    write!(f, "line of {n} bytes is longer than {MAX_LINE}")
                }
                ProtocolError::NotAscii => {
                    write!(f, "line holds bytes that are not printable ASCII")
                }
                ProtocolError::MissingChecksum => write!(f, "line has no ' ~crc32' trailer"),
                ProtocolError::BadChecksum { expected, found } => {
                    write!(
                        f,
                        "checksum mismatch: line says {found:?}, content gives {expected:08x}"
                    )
                }
                ProtocolError::UnknownKind(k) => write!(f, "unknown line kind {k:?}"),
                ProtocolError::MalformedField(t) => write!(f, "malformed field {t:?}"),
                ProtocolError::DuplicateField(k) => write!(f, "field {k:?} appears twice"),
                ProtocolError::MissingField(k) => write!(f, "required field {k:?} is missing"),
                ProtocolError::BadValue { key, value } => {
                    write!(f, "field {key:?} has an invalid value {value:?}")
                }
                ProtocolError::UnknownWorkload(w) => write!(f, "unknown workload {w:?}"),
                ProtocolError::UnknownMetric { workload, metric } => {
                    write!(f, "workload {workload} has no metric {metric:?}")
                }
            }
        }
    }

    impl std::error::Error for ProtocolError {}

    /// A checked line: its kind and its decoded fields, not yet interpreted.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct RawLine {
        pub kind: LineKind,
        pub fields: Vec<(String, String)>,
    }

    impl RawLine {
        pub fn get(&self, key: &str) -> Option<&str> {
            self.fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }

        fn require(&self, key: &'static str) -> Result<&str, ProtocolError> {
            self.get(key).ok_or(ProtocolError::MissingField(key))
        }

        pub fn number(&self, key: &'static str) -> Result<u64, ProtocolError> {
            let text = self.require(key)?;
            parse_u64(text).ok_or_else(|| ProtocolError::BadValue {
                key,
                value: text.to_string(),
            })
        }

        fn optional_number(&self, key: &'static str) -> Result<Option<u64>, ProtocolError> {
            match self.get(key) {
                None => Ok(None),
                Some(_) => self.number(key).map(Some),
            }
        }

        fn workload(&self) -> Result<WorkloadId, ProtocolError> {
            let name = self.require("w")?;
            WorkloadId::from_name(name)
                .ok_or_else(|| ProtocolError::UnknownWorkload(name.to_string()))
        }

        fn optional_workload(&self) -> Result<Option<WorkloadId>, ProtocolError> {
            match self.get("w") {
                None => Ok(None),
                Some(_) => self.workload().map(Some),
            }
        }

        pub fn status(&self) -> Result<Status, ProtocolError> {
            let text = self.require("status")?;
            Status::from_name(text).ok_or_else(|| ProtocolError::BadValue {
                key: "status",
                value: text.to_string(),
            })
        }
    }

    fn parse_u64(text: &str) -> Option<u64> {
        if let Some(hex) = text.strip_prefix("0x") {
            if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u64::from_str_radix(hex, 16).ok()
        } else if !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse().ok()
        } else {
            None
        }
    }

    fn percent_decode(text: &str) -> Option<String> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    // Two hex digits exactly (`from_str_radix` alone would take a sign).
                    let hex = text.get(i + 1..i + 3)?;
                    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return None;
                    }
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
                b if is_plain_value_byte(b) => {
                    out.push(b);
                    i += 1;
                }
                _ => return None,
            }
        }
        String::from_utf8(out).ok()
    }

    /// Checks one console line (without its newline). `Ok(None)`: not a protocol line
    /// (console noise). `Err`: a protocol line that cannot be trusted.
    pub fn decode_line(line: &[u8]) -> Result<Option<RawLine>, ProtocolError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.starts_with(PREFIX.as_bytes()) {
            return Ok(None);
        }
        if line.len() > MAX_LINE {
            return Err(ProtocolError::TooLong(line.len()));
        }
        if !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(ProtocolError::NotAscii);
        }
        // All bytes are ASCII now, so this cannot fail.
        let line = core::str::from_utf8(line).map_err(|_| ProtocolError::NotAscii)?;
        // The trailer is searched for after the prefix only: the prefix ends in a space,
        // so a search over the whole line could split inside it (`@hvb1 ~...`).
        let (fields_text, crc_text) = line
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.rsplit_once(" ~"))
            .ok_or(ProtocolError::MissingChecksum)?;
        let body = &line[..PREFIX.len() + fields_text.len()];
        let expected = crc32(body.as_bytes());
        let crc_ok = crc_text.len() == 8
            && crc_text.bytes().all(|b| b.is_ascii_hexdigit())
            && u32::from_str_radix(crc_text, 16).ok() == Some(expected);
        if !crc_ok {
            return Err(ProtocolError::BadChecksum {
                expected,
                found: crc_text.to_string(),
            });
        }
        let mut words = fields_text.split(' ');
        let kind_text = words.next().unwrap_or("");
        let kind = LineKind::from_name(kind_text)
            .ok_or_else(|| ProtocolError::UnknownKind(kind_text.to_string()))?;
        let mut fields: Vec<(String, String)> = Vec::new();
        for word in words {
            let (key, value) = word
                .split_once('=')
                .filter(|(k, _)| !k.is_empty() && k.len() <= 16 && k.bytes().all(is_key_byte))
                .ok_or_else(|| ProtocolError::MalformedField(word.to_string()))?;
            let value = percent_decode(value)
                .ok_or_else(|| ProtocolError::MalformedField(word.to_string()))?;
            if fields.iter().any(|(k, _)| k == key) {
                return Err(ProtocolError::DuplicateField(key.to_string()));
            }
            fields.push((key.to_string(), value));
        }
        Ok(Some(RawLine { kind, fields }))
    }

    /// What the guest said in its `hello` line.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Hello {
        pub proto: u64,
        pub hypervisor: Hypervisor,
        /// The 12-byte CPUID signature as read (empty without a hypervisor leaf).
        pub signature: String,
        pub cpu_vendor: String,
        /// TSC frequency the hypervisor advertises to the guest, if any.
        pub tsc_khz: Option<u64>,
        /// Where `tsc_khz` came from (`kvm-cpuid-0x40000010`, `xen-cpuid-leaf4`, `none`).
        pub tsc_source: String,
        /// RAM in the guest's PVH memory map, in bytes.
        pub ram_bytes: Option<u64>,
    }

    /// One sample: `ops` operations took `cycles` TSC cycles.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Sample {
        pub workload: WorkloadId,
        pub metric: &'static str,
        /// Parameters of this series (a working-set size, a page size); empty if none.
        pub params: String,
        pub index: u64,
        /// A warm-up sample: kept in the record, left out of the statistics.
        pub warmup: bool,
        pub ops: u64,
        pub cycles: u64,
        /// The sequence number (from 0, per boot) of the instruction-count marker pair
        /// the guest placed around this sample (`mk`), when it placed one.
        pub marker: Option<u64>,
    }

    /// Register state the guest's exception handler reported.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CrashReport {
        pub workload: Option<WorkloadId>,
        pub vector: u64,
        pub error_code: u64,
        pub rip: u64,
        pub cs: u64,
        pub rsp: u64,
        pub cr2: u64,
    }

    /// One interpreted protocol line.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        Hello(Hello),
        Start(WorkloadId),
        Sample(Sample),
        Skip {
            workload: WorkloadId,
            reason: String,
        },
        Result {
            workload: WorkloadId,
            status: Status,
            reason: Option<String>,
        },
        Note {
            workload: Option<WorkloadId>,
            key: String,
            value: String,
        },
        Crash(CrashReport),
        End(Status),
    }

    /// Longest free-text value (a reason, a note) the harness keeps.
    pub const MAX_TEXT: usize = 400;

    fn bounded_text(raw: &RawLine, key: &'static str) -> Result<String, ProtocolError> {
        let text = raw.require(key)?;
        if text.len() > MAX_TEXT {
            return Err(ProtocolError::BadValue {
                key,
                value: text.chars().take(40).collect(),
            });
        }
        Ok(text.to_string())
    }

    impl Event {
        /// Interprets a checked line, strictly: every number in range, every name known.
        pub fn from_raw(raw: &RawLine) -> Result<Event, ProtocolError> {
            Ok(match raw.kind {
                LineKind::Hello => {
                    let hv = raw.require("hv")?;
                    Event::Hello(Hello {
                        proto: raw.number("proto")?,
                        hypervisor: Hypervisor::from_name(hv).ok_or_else(|| {
                            ProtocolError::BadValue {
                                key: "hv",
                                value: hv.to_string(),
                            }
                        })?,
                        signature: bounded_text(raw, "sig")?,
                        cpu_vendor: bounded_text(raw, "vendor")?,
                        tsc_khz: raw.optional_number("tsc_khz")?.filter(|&k| k > 0),
                        tsc_source: bounded_text(raw, "tsc_src")?,
                        ram_bytes: raw.optional_number("ram")?,
                    })
                }
                LineKind::Start => Event::Start(raw.workload()?),
                LineKind::Sample => {
                    let workload = raw.workload()?;
                    let metric_name = raw.require("m")?;
                    let metric = workload
                        .spec()
                        .metrics
                        .iter()
                        .find(|m| m.name == metric_name)
                        .ok_or_else(|| ProtocolError::UnknownMetric {
                            workload: workload.name(),
                            metric: metric_name.to_string(),
                        })?
                        .name;
                    let ops = raw.number("ops")?;
                    if ops == 0 {
                        return Err(ProtocolError::BadValue {
                            key: "ops",
                            value: "0".to_string(),
                        });
                    }
                    let warmup = match raw.get("warm") {
                        None | Some("0") => false,
                        Some("1") => true,
                        Some(v) => {
                            return Err(ProtocolError::BadValue {
                                key: "warm",
                                value: v.to_string(),
                            })
                        }
                    };
                    Event::Sample(Sample {
                        workload,
                        metric,
                        params: match raw.get("p") {
                            Some(_) => bounded_text(raw, "p")?,
                            None => String::new(),
                        },
                        index: raw.number("n")?,
                        warmup,
                        ops,
                        cycles: raw.number("cycles")?,
                        marker: raw.optional_number("mk")?,
                    })
                }
                LineKind::Skip => Event::Skip {
                    workload: raw.workload()?,
                    reason: bounded_text(raw, "reason")?,
                },
                LineKind::Result => Event::Result {
                    workload: raw.workload()?,
                    status: raw.status()?,
                    reason: match raw.get("reason") {
                        Some(_) => Some(bounded_text(raw, "reason")?),
                        None => None,
                    },
                },
                LineKind::Note => Event::Note {
                    workload: raw.optional_workload()?,
                    key: bounded_text(raw, "k")?,
                    value: bounded_text(raw, "v")?,
                },
                LineKind::Crash => Event::Crash(CrashReport {
                    workload: raw.optional_workload()?,
                    vector: raw.number("vector")?,
                    error_code: raw.number("err")?,
                    rip: raw.number("rip")?,
                    cs: raw.number("cs")?,
                    rsp: raw.number("rsp")?,
                    cr2: raw.number("cr2")?,
                }),
                LineKind::End => Event::End(raw.status()?),
            })
        }
    }

    /// Decodes one console line into an event: `Ok(None)` for console noise.
    pub fn decode_event(line: &[u8]) -> Result<Option<Event>, ProtocolError> {
        match decode_line(line)? {
            None => Ok(None),
            Some(raw) => Event::from_raw(&raw).map(Some),
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::table::WorkloadId;
    use std::string::String;
    use std::vec::Vec;

    fn line(b: &mut LineBuilder) -> Vec<u8> {
        let mut v = b.finish().to_vec();
        assert_eq!(v.pop(), Some(b'\n'));
        v
    }

    #[test]
    fn sample_round_trip() {
        let l = line(
            LineBuilder::new(LineKind::Sample)
                .text("w", "cpu.cpuid")
                .text("m", "latency")
                .num("n", 3)
                .num("ops", 4096)
                .num("cycles", u64::MAX),
        );
        let ev = decode_event(&l).unwrap().unwrap();
        assert_eq!(
            ev,
            Event::Sample(Sample {
                workload: WorkloadId::CpuCpuid,
                metric: "latency",
                params: String::new(),
                index: 3,
                warmup: false,
                ops: 4096,
                cycles: u64::MAX,
                marker: None,
            })
        );
    }

    #[test]
    fn text_is_escaped_and_restored() {
        let reason = "no ioeventfd: <script>alert(\"x\")</script> 100% ~ a=b";
        let l = line(
            LineBuilder::new(LineKind::Skip)
                .text("w", "io.pio-out-kernel")
                .text("reason", reason),
        );
        assert!(!l.windows(2).any(|w| w == b"% " || w == b"~ "));
        assert!(!l[PREFIX.len()..].contains(&b' ') || l.split(|&b| b == b' ').count() == 5);
        assert_eq!(l.iter().filter(|&&b| b == b'~').count(), 1);
        match decode_event(&l).unwrap().unwrap() {
            Event::Skip { reason: r, .. } => assert_eq!(r, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hex_and_crash() {
        let l = line(
            LineBuilder::new(LineKind::Crash)
                .text("w", "selftest.hang")
                .num("vector", 14)
                .hex("err", 2)
                .hex("rip", 0xffff_8000_0010_2030)
                .hex("cs", 0x2b)
                .hex("rsp", 0x7000)
                .hex("cr2", 0xdead_beef),
        );
        match decode_event(&l).unwrap().unwrap() {
            Event::Crash(c) => {
                assert_eq!(c.vector, 14);
                assert_eq!(c.rip, 0xffff_8000_0010_2030);
                assert_eq!(c.cr2, 0xdead_beef);
                assert_eq!(c.workload, Some(WorkloadId::SelftestHang));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn noise_is_not_an_error() {
        assert_eq!(decode_line(b"Booting kernel..."), Ok(None));
        assert_eq!(decode_line(b""), Ok(None));
        assert_eq!(decode_line(b"\xff\xfe garbage"), Ok(None));
    }

    #[test]
    fn damaged_lines_are_rejected() {
        let good = line(LineBuilder::new(LineKind::End).text("status", "success"));
        assert!(decode_line(&good).unwrap().is_some());

        // Any single flipped byte in the body is caught.
        for i in PREFIX.len()..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(decode_line(&bad).is_err(), "flip at {i} went unnoticed");
        }
        // Truncation is caught.
        assert!(
            matches!(
                decode_line(&good[..good.len() - 1]),
                Err(ProtocolError::BadChecksum { .. })
            ),
            "a truncated checksum went unnoticed"
        );
        let no_crc = b"@hvb1 end status=success";
        assert_eq!(decode_line(no_crc), Err(ProtocolError::MissingChecksum));
        let mut binary = good.clone();
        binary[8] = 0x80;
        assert_eq!(decode_line(&binary), Err(ProtocolError::NotAscii));
    }

    #[test]
    fn over_long_lines_are_rejected_and_builder_never_overflows() {
        let mut long = Vec::from(PREFIX.as_bytes());
        long.resize(MAX_LINE + 100, b'a');
        assert_eq!(
            decode_line(&long),
            Err(ProtocolError::TooLong(MAX_LINE + 100))
        );

        let huge = "x".repeat(4 * MAX_LINE);
        let mut b = LineBuilder::new(LineKind::Skip);
        b.text("w", "cpu.idle")
            .text("reason", &huge)
            .num("extra", 1);
        let l = line(&mut b);
        assert!(l.len() <= MAX_LINE);
        // Still a valid line, with the reason cut; too long for a reason, so refused
        // as a value, never as a panic.
        let raw = decode_line(&l).unwrap().unwrap();
        assert!(raw.fields[1].1.len() < MAX_LINE);
    }

    #[test]
    fn semantic_checks() {
        let unknown = line(LineBuilder::new(LineKind::Start).text("w", "cpu.nope"));
        assert!(matches!(
            decode_event(&unknown),
            Err(ProtocolError::UnknownWorkload(_))
        ));
        let metric = line(
            LineBuilder::new(LineKind::Sample)
                .text("w", "cpu.idle")
                .text("m", "bandwidth")
                .num("n", 0)
                .num("ops", 1)
                .num("cycles", 1),
        );
        assert!(matches!(
            decode_event(&metric),
            Err(ProtocolError::UnknownMetric { .. })
        ));
        let zero_ops = line(
            LineBuilder::new(LineKind::Sample)
                .text("w", "cpu.idle")
                .text("m", "latency")
                .num("n", 0)
                .num("ops", 0)
                .num("cycles", 1),
        );
        assert!(
            matches!(
                decode_event(&zero_ops),
                Err(ProtocolError::BadValue { key: "ops", .. })
            ),
            "ops=0 accepted"
        );
        let missing = line(&mut LineBuilder::new(LineKind::Start));
        assert_eq!(
            decode_event(&missing),
            Err(ProtocolError::MissingField("w"))
        );
        let dup = line(
            LineBuilder::new(LineKind::Start)
                .text("w", "cpu.idle")
                .text("w", "cpu.idle"),
        );
        assert!(matches!(
            decode_event(&dup),
            Err(ProtocolError::DuplicateField(_))
        ));
        let status = line(LineBuilder::new(LineKind::End).text("status", "great"));
        assert!(matches!(
            decode_event(&status),
            Err(ProtocolError::BadValue { .. })
        ));
        let bignum = b"@hvb1 end status=success n=999999999999999999999999";
        // No checksum either: refused before the number is parsed.
        assert_eq!(decode_line(bignum), Err(ProtocolError::MissingChecksum));
    }

    /// Issue 8, defect 2: the trailer search matched the space that ends the prefix, and
    /// slicing the fields after the prefix then panicked.
    #[test]
    fn trailer_inside_the_prefix_is_refused_not_a_panic() {
        let line = b"@hvb1 ~362a6d45";
        assert_eq!(line.len(), 15);
        assert_eq!(decode_line(line), Err(ProtocolError::MissingChecksum));
        assert_eq!(decode_event(line), Err(ProtocolError::MissingChecksum));
        // The CRC there is that of `@hvb1`: still no line, whatever the trailer says.
        assert_eq!(crc32(b"@hvb1"), 0x362a_6d45);
        assert!(
            matches!(
                decode_line(b"@hvb1  ~00000000"),
                Err(ProtocolError::BadChecksum { .. })
            ),
            "an empty line with a wrong checksum accepted"
        );
    }

    #[test]
    fn signs_are_not_hex_digits() {
        let body = b"@hvb1 note k=a%+5 v=b";
        let mut l = body.to_vec();
        l.extend_from_slice(std::format!(" ~{:08x}", crc32(body)).as_bytes());
        assert!(matches!(
            decode_line(&l),
            Err(ProtocolError::MalformedField(_))
        ));
        let body = b"@hvb1 end status=success";
        let mut l = body.to_vec();
        l.extend_from_slice(std::format!(" ~+{:07x}", crc32(body) & 0x0fff_ffff).as_bytes());
        assert!(matches!(
            decode_line(&l),
            Err(ProtocolError::BadChecksum { .. })
        ));
    }

    #[test]
    fn status_ratchets() {
        assert_eq!(Status::Success.ratchet(Status::Skip), Status::Skip);
        assert_eq!(Status::Failure.ratchet(Status::Error), Status::Failure);
        assert_eq!(Status::Timeout.ratchet(Status::Crash), Status::Crash);
        for s in Status::ALL {
            assert_eq!(Status::from_name(s.name()), Some(s));
        }
    }
}

/// Property tests of the decoder (issue 8, defect 2): no input panics it, and every line
/// the guest's [`LineBuilder`] can print decodes back to what was encoded. The case counts
/// are fixed so that `cargo test` runs them in a bounded time (well under a second each).
#[cfg(all(test, feature = "std"))]
mod props {
    use super::*;
    use crate::table::{Hypervisor, WorkloadId, WORKLOADS};
    use proptest::prelude::*;
    use proptest::test_runner::Config;
    use std::string::String;
    use std::vec::Vec;

    const CASES: u32 = 1024;
    /// Fewer for the properties that generate whole lines byte by byte (the slow part).
    const LONG_CASES: u32 = 384;

    /// Runs every public decoder on `line`; a panic fails the property.
    fn decode_all(line: &[u8]) {
        let event = decode_event(line);
        let raw = decode_line(line);
        match (&raw, &event) {
            (Ok(None), Ok(None)) | (Err(_), Err(_)) | (Ok(Some(_)), _) => {}
            _ => panic!("decode_line {raw:?} and decode_event {event:?} disagree"),
        }
        if let Ok(Some(raw)) = raw {
            let _ = Event::from_raw(&raw);
        }
        if let Err(e) = event {
            let _ = std::format!("{e}");
        }
    }

    /// `body` with the trailer a guest would print (so the fuzzing gets past the CRC).
    fn with_crc(body: &[u8]) -> Vec<u8> {
        let mut l = body.to_vec();
        l.extend_from_slice(std::format!(" ~{:08x}", crc32(body)).as_bytes());
        l
    }

    /// Bytes that matter to the protocol, mixed with anything.
    fn protocol_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            4 => prop::sample::select(b" =~%@hvb1wmpx0123456789abcdefABCDEF.-_\\r".to_vec()),
            2 => 0x20u8..0x7f,
            1 => any::<u8>(),
        ]
    }

    fn kind() -> impl Strategy<Value = LineKind> {
        prop::sample::select(LineKind::ALL.to_vec())
    }

    fn workload() -> impl Strategy<Value = WorkloadId> {
        prop::sample::select(WORKLOADS.iter().map(|w| w.id).collect::<Vec<_>>())
    }

    fn text(max_chars: usize) -> impl Strategy<Value = String> {
        let ch = prop_oneof![
            4 => (0u8..0x80).prop_map(char::from),
            1 => any::<char>(),
        ];
        prop::collection::vec(ch, 0..max_chars).prop_map(|v| v.into_iter().collect())
    }

    /// ASCII text (one byte per character, three at most encoded): lines with several
    /// text fields stay under [`MAX_LINE`], so the builder never cuts them.
    fn ascii(max_chars: usize) -> impl Strategy<Value = String> {
        prop::collection::vec((0u8..0x80).prop_map(char::from), 0..max_chars)
            .prop_map(|v| v.into_iter().collect())
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(Status::ALL.to_vec())
    }

    fn hypervisor() -> impl Strategy<Value = Hypervisor> {
        prop::sample::select(std::vec![
            Hypervisor::Kvm,
            Hypervisor::Xen,
            Hypervisor::Other,
            Hypervisor::None
        ])
    }

    /// Any event the decoder accepts (numbers through the whole `u64` range).
    fn event() -> impl Strategy<Value = Event> {
        let sample_workloads: Vec<WorkloadId> = WORKLOADS
            .iter()
            .filter(|w| !w.metrics.is_empty())
            .map(|w| w.id)
            .collect();
        let sample = (
            prop::sample::select(sample_workloads),
            any::<prop::sample::Index>(),
            ascii(60),
            (any::<u64>(), any::<bool>(), 1..=u64::MAX, any::<u64>()),
        )
            .prop_map(|(w, m, params, (index, warmup, ops, cycles))| {
                let metrics = w.spec().metrics;
                Event::Sample(Sample {
                    workload: w,
                    metric: metrics[m.index(metrics.len())].name,
                    params,
                    index,
                    warmup,
                    ops,
                    cycles,
                    marker: (index % 3 != 0).then_some(index / 3),
                })
            });
        let hello = (
            any::<u64>(),
            hypervisor(),
            ascii(16),
            ascii(16),
            prop::option::of(1..=u64::MAX),
            ascii(32),
            prop::option::of(any::<u64>()),
        )
            .prop_map(
                |(proto, hypervisor, signature, cpu_vendor, tsc_khz, tsc_source, ram_bytes)| {
                    Event::Hello(Hello {
                        proto,
                        hypervisor,
                        signature,
                        cpu_vendor,
                        tsc_khz,
                        tsc_source,
                        ram_bytes,
                    })
                },
            );
        let crash = (prop::option::of(workload()), [any::<u64>(); 6]).prop_map(|(workload, n)| {
            Event::Crash(CrashReport {
                workload,
                vector: n[0],
                error_code: n[1],
                rip: n[2],
                cs: n[3],
                rsp: n[4],
                cr2: n[5],
            })
        });
        prop_oneof![
            hello,
            workload().prop_map(Event::Start),
            sample,
            (workload(), text(30)).prop_map(|(workload, reason)| Event::Skip { workload, reason }),
            (workload(), status(), prop::option::of(text(30))).prop_map(
                |(workload, status, reason)| Event::Result {
                    workload,
                    status,
                    reason
                }
            ),
            (prop::option::of(workload()), text(12), text(12)).prop_map(
                |(workload, key, value)| Event::Note {
                    workload,
                    key,
                    value
                }
            ),
            crash,
            status().prop_map(Event::End),
        ]
    }

    /// Prints `event` as the guest would; `hex` picks `0x` numbers where the guest may.
    fn encode(event: &Event, hex: bool) -> Vec<u8> {
        let number = |b: &mut LineBuilder, key: &str, v: u64| {
            if hex {
                b.hex(key, v);
            } else {
                b.num(key, v);
            }
        };
        let mut b;
        match event {
            Event::Hello(h) => {
                b = LineBuilder::new(LineKind::Hello);
                number(&mut b, "proto", h.proto);
                b.text("hv", h.hypervisor.name())
                    .text("sig", &h.signature)
                    .text("vendor", &h.cpu_vendor)
                    .text("tsc_src", &h.tsc_source);
                if let Some(k) = h.tsc_khz {
                    number(&mut b, "tsc_khz", k);
                }
                if let Some(r) = h.ram_bytes {
                    number(&mut b, "ram", r);
                }
            }
            Event::Start(w) => {
                b = LineBuilder::new(LineKind::Start);
                b.text("w", w.name());
            }
            Event::Sample(s) => {
                b = LineBuilder::new(LineKind::Sample);
                b.text("w", s.workload.name()).text("m", s.metric);
                if !s.params.is_empty() {
                    b.text("p", &s.params);
                }
                number(&mut b, "n", s.index);
                if s.warmup {
                    b.num("warm", 1);
                }
                number(&mut b, "ops", s.ops);
                number(&mut b, "cycles", s.cycles);
                if let Some(mk) = s.marker {
                    number(&mut b, "mk", mk);
                }
            }
            Event::Skip { workload, reason } => {
                b = LineBuilder::new(LineKind::Skip);
                b.text("w", workload.name()).text("reason", reason);
            }
            Event::Result {
                workload,
                status,
                reason,
            } => {
                b = LineBuilder::new(LineKind::Result);
                b.text("w", workload.name()).text("status", status.name());
                if let Some(r) = reason {
                    b.text("reason", r);
                }
            }
            Event::Note {
                workload,
                key,
                value,
            } => {
                b = LineBuilder::new(LineKind::Note);
                if let Some(w) = workload {
                    b.text("w", w.name());
                }
                b.text("k", key).text("v", value);
            }
            Event::Crash(c) => {
                b = LineBuilder::new(LineKind::Crash);
                if let Some(w) = c.workload {
                    b.text("w", w.name());
                }
                number(&mut b, "vector", c.vector);
                number(&mut b, "err", c.error_code);
                number(&mut b, "rip", c.rip);
                number(&mut b, "cs", c.cs);
                number(&mut b, "rsp", c.rsp);
                number(&mut b, "cr2", c.cr2);
            }
            Event::End(s) => {
                b = LineBuilder::new(LineKind::End);
                b.text("status", s.name());
            }
        }
        let mut line = b.finish().to_vec();
        line.pop(); // the newline
        line
    }

    /// One change to a valid line: cut it, flip, overwrite, insert or delete a byte.
    #[derive(Clone, Debug)]
    enum Mutation {
        Truncate(prop::sample::Index),
        Flip(prop::sample::Index, u8),
        Set(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Delete(prop::sample::Index),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let at = any::<prop::sample::Index>;
        prop_oneof![
            at().prop_map(Mutation::Truncate),
            (at(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
            (at(), protocol_byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (at(), protocol_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            at().prop_map(Mutation::Delete),
        ]
    }

    fn apply(line: &mut Vec<u8>, m: &Mutation) {
        if line.is_empty() {
            return;
        }
        match m {
            Mutation::Truncate(i) => line.truncate(i.index(line.len())),
            Mutation::Flip(i, x) => {
                let i = i.index(line.len());
                line[i] ^= x;
            }
            Mutation::Set(i, b) => {
                let i = i.index(line.len());
                line[i] = *b;
            }
            Mutation::Insert(i, b) => line.insert(i.index(line.len() + 1), *b),
            Mutation::Delete(i) => {
                line.remove(i.index(line.len()));
            }
        }
    }

    /// Strips a trailer the line may still have (so a CRC can be recomputed over a body).
    fn body_of(line: &[u8]) -> &[u8] {
        match line.windows(2).rposition(|w| w == b" ~") {
            Some(i) if i >= PREFIX.len() => &line[..i],
            _ => line,
        }
    }

    proptest! {
        #![proptest_config(Config { cases: CASES, failure_persistence: None, ..Config::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            decode_all(&bytes);
        }

        #[test]
        fn valid_lines_round_trip(ev in event(), hex in any::<bool>()) {
            let line = encode(&ev, hex);
            prop_assert!(line.len() <= MAX_LINE, "builder cut the line: {line:?}");
            let decoded = decode_event(&line);
            prop_assert_eq!(decoded, Ok(Some(ev.clone())));
            // A carriage return from the console is tolerated.
            let mut crlf = line.clone();
            crlf.push(b'\r');
            prop_assert_eq!(decode_event(&crlf), Ok(Some(ev)));
        }

        #[test]
        fn mutated_lines_never_panic(
            ev in event(),
            hex in any::<bool>(),
            mutations in prop::collection::vec(mutation(), 1..4),
            recrc in any::<bool>(),
        ) {
            let mut line = encode(&ev, hex);
            for m in &mutations {
                apply(&mut line, m);
            }
            decode_all(&line);
            if recrc {
                // Damage the checksum would catch, re-signed: the field checks must hold.
                let body = body_of(&line).to_vec();
                decode_all(&with_crc(&body));
            }
        }
    }

    proptest! {
        #![proptest_config(Config { cases: LONG_CASES, failure_persistence: None, ..Config::default() })]

        #[test]
        fn prefixed_lines_never_panic(
            rest in prop::collection::vec(protocol_byte(), 0..(MAX_LINE + 8)),
            cut in any::<prop::sample::Index>(),
            short in 0..=PREFIX.len(),
        ) {
            let mut line = Vec::from(PREFIX.as_bytes());
            line.extend_from_slice(&rest);
            decode_all(&line);
            decode_all(&with_crc(&line));
            // Signed at any cut, the prefix's own space included.
            decode_all(&with_crc(&line[..cut.index(line.len() + 1)]));
            decode_all(&with_crc(&line[..short]));
        }

        #[test]
        fn prefixed_field_lines_never_panic(
            k in kind(),
            words in prop::collection::vec(
                (prop::collection::vec(protocol_byte(), 0..6),
                 prop::collection::vec(protocol_byte(), 0..24)),
                0..12,
            ),
        ) {
            let mut body = std::format!("{PREFIX}{}", k.name()).into_bytes();
            for (key, value) in &words {
                body.push(b' ');
                body.extend_from_slice(key);
                body.push(b'=');
                body.extend_from_slice(value);
            }
            decode_all(&body);
            decode_all(&with_crc(&body));
        }
    }
}
