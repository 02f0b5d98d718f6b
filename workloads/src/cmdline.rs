//! The guest command line: how the harness tells the guest what to run.
//!
//! `hvbench run=cpu.idle,cpu.cpuid samples=10 warmup=1 sample_us=10000 p.mem.tlb-chase.ws=64k,1m`
//!
//! `p.<workload>.<key>=<value>` is a parameter of one workload: its key must be one of the
//! workload's row ([`crate::table::Workload::params`]) and its value within the row's
//! bounds, or the whole line is refused. The workload reads it with [`param_or_default`].
//!
//! It travels in the PVH start info (our VMM, QEMU's `-append`, xl's `cmdline=`), so it is
//! plain ASCII, space separated, and short enough for every loader (Xen takes 1 KiB).

#[cfg(test)]
use crate::params::parse_size;
#[cfg(feature = "std")]
use crate::params::SetBy;
use crate::params::{ParamError, ParamSpec};
use crate::table::{WorkloadId, WORKLOADS};

/// First word of every hvbench command line, so a stray command line is recognised.
pub const MAGIC: &str = "hvbench";

pub const DEFAULT_SAMPLES: u32 = 10;
pub const DEFAULT_WARMUP: u32 = 1;
pub const DEFAULT_SAMPLE_US: u32 = 10_000;
pub const MAX_SAMPLES: u32 = 10_000;
pub const MAX_WARMUP: u32 = 100;
pub const MIN_SAMPLE_US: u32 = 100;
pub const MAX_SAMPLE_US: u32 = 10_000_000;
/// Most vCPUs the guest is told it has (APIC IDs are 8 bits; 0xff is broadcast).
pub const MAX_CPUS: u32 = 254;

/// Longest command line the harness produces (Xen's limit).
pub const MAX_CMDLINE: usize = 1024;
/// Most workload parameters on one command line.
pub const MAX_PARAMS: usize = 16;
/// Longest parameter key and value.
pub const MAX_PARAM_KEY: usize = 16;
pub const MAX_PARAM_VALUE: usize = 128;

/// What the guest is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// Bit `WorkloadId as usize` set for each selected workload; run in table order.
    pub selected: u64,
    /// Measured samples kept per workload and metric.
    pub samples: u32,
    /// Samples run and discarded before the kept ones.
    pub warmup: u32,
    /// Minimum duration of one sample; the iteration count is doubled until reached.
    pub sample_us: u32,
    /// Place the instruction-count markers (8-byte NOPs a TCG plugin counts between)
    /// around each timed sample, number them in the sample lines, and run a fixed 64
    /// operations per sample instead of calibrating, so counts compare (`markers=1`).
    pub markers: bool,
    /// vCPUs the guest was given (`cpus=`, 1 when absent): the boot vCPU and the
    /// application processors the guest may start (APIC IDs 1..cpus).
    pub cpus: u32,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            selected: 0,
            samples: DEFAULT_SAMPLES,
            warmup: DEFAULT_WARMUP,
            sample_us: DEFAULT_SAMPLE_US,
            markers: false,
            cpus: 1,
        }
    }
}

impl GuestConfig {
    pub fn select(&mut self, id: WorkloadId) {
        self.selected |= 1 << id as u64;
    }

    pub fn is_selected(&self, id: WorkloadId) -> bool {
        self.selected & (1 << id as u64) != 0
    }

    /// The selected workloads in table order.
    pub fn workloads(&self) -> impl Iterator<Item = WorkloadId> + '_ {
        WORKLOADS
            .iter()
            .map(|w| w.id)
            .filter(|id| self.is_selected(*id))
    }
}

/// Why a command line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError {
    NotHvbench,
    UnknownKey,
    UnknownWorkload,
    BadNumber,
    OutOfRange,
    NothingSelected,
    BadParameter,
}

impl CmdlineError {
    pub const fn message(self) -> &'static str {
        match self {
            CmdlineError::NotHvbench => "command line does not start with 'hvbench'",
            CmdlineError::UnknownKey => "unknown key on the command line",
            CmdlineError::UnknownWorkload => "unknown workload on the command line",
            CmdlineError::BadNumber => "malformed number on the command line",
            CmdlineError::OutOfRange => "number out of range on the command line",
            CmdlineError::NothingSelected => "no workload selected",
            CmdlineError::BadParameter => {
                "malformed or unknown workload parameter on the command line"
            }
        }
    }
}

/// Parses a command line (guest side). Strict: anything unknown is an error.
pub fn parse(line: &str) -> Result<GuestConfig, CmdlineError> {
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(MAGIC) {
        return Err(CmdlineError::NotHvbench);
    }
    let mut config = GuestConfig::default();
    let mut params = 0;
    for word in words {
        let (key, value) = word.split_once('=').ok_or(CmdlineError::UnknownKey)?;
        if let Some(rest) = key.strip_prefix("p.") {
            split_param(rest, value).ok_or(CmdlineError::BadParameter)?;
            params += 1;
            if params > MAX_PARAMS {
                return Err(CmdlineError::BadParameter);
            }
            continue;
        }
        match key {
            "run" => {
                for name in value.split(',').filter(|n| !n.is_empty()) {
                    let id = WorkloadId::from_name(name).ok_or(CmdlineError::UnknownWorkload)?;
                    config.select(id);
                }
            }
            "samples" => config.samples = number(value, 1, MAX_SAMPLES)?,
            "warmup" => config.warmup = number(value, 0, MAX_WARMUP)?,
            "sample_us" => config.sample_us = number(value, MIN_SAMPLE_US, MAX_SAMPLE_US)?,
            "markers" => config.markers = number(value, 0, 1)? == 1,
            "cpus" => config.cpus = number(value, 1, MAX_CPUS)?,
            _ => return Err(CmdlineError::UnknownKey),
        }
    }
    if config.selected == 0 {
        return Err(CmdlineError::NothingSelected);
    }
    Ok(config)
}

fn is_param_text(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b',' | b':' | b'.'))
}

/// Why a workload parameter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRefusal {
    /// `WORKLOAD.KEY=VALUE` with characters outside the safe set, or too long.
    BadText,
    UnknownWorkload,
    /// The workload's row has no parameter of that key.
    UnknownKey(WorkloadId),
    /// The key is the harness's to set, not the user's.
    HostOnly(WorkloadId, &'static ParamSpec),
    /// The value breaks the parameter's kind or bounds.
    Value(WorkloadId, &'static ParamSpec, ParamError),
}

/// Looks `<workload>.<key>=<value>` up in the table and checks the value against the row.
pub fn lookup_param(
    workload: &str,
    key: &str,
    value: &str,
) -> Result<(WorkloadId, &'static ParamSpec), ParamRefusal> {
    let id = WorkloadId::from_name(workload).ok_or(ParamRefusal::UnknownWorkload)?;
    if !is_param_text(key, MAX_PARAM_KEY) || !is_param_text(value, MAX_PARAM_VALUE) {
        return Err(ParamRefusal::BadText);
    }
    let spec = id.spec().param(key).ok_or(ParamRefusal::UnknownKey(id))?;
    spec.check(value)
        .map_err(|e| ParamRefusal::Value(id, spec, e))?;
    Ok((id, spec))
}

/// Splits `<workload>.<key>` (after `p.`) and checks both parts and the value.
fn split_param<'a>(
    name: &'a str,
    value: &'a str,
) -> Option<(WorkloadId, &'static ParamSpec, &'a str)> {
    let (workload, key) = name.rsplit_once('.')?;
    let (id, spec) = lookup_param(workload, key, value).ok()?;
    Some((id, spec, value))
}

/// The value of parameter `key` of `workload` on a (parsed) command line, if given.
pub fn param<'a>(line: &'a str, workload: WorkloadId, key: &str) -> Option<&'a str> {
    line.split_ascii_whitespace().find_map(|word| {
        let (name, value) = word.strip_prefix("p.")?.split_once('=')?;
        let (id, spec, v) = split_param(name, value)?;
        (id == workload && spec.key == key).then_some(v)
    })
}

/// The value of `spec` for `workload`: the command line's, else the row's default.
pub fn param_or_default<'a>(
    line: &'a str,
    workload: WorkloadId,
    spec: &ParamSpec,
) -> Option<&'a str> {
    param(line, workload, spec.key).or(spec.default)
}

fn number(text: &str, min: u32, max: u32) -> Result<u32, CmdlineError> {
    let v: u32 = text.parse().map_err(|_| CmdlineError::BadNumber)?;
    if v < min || v > max {
        return Err(CmdlineError::OutOfRange);
    }
    Ok(v)
}

/// Builds the command line for `config` and workload parameters (harness side).
#[cfg(feature = "std")]
pub fn encode_with_params(
    config: &GuestConfig,
    params: &[(WorkloadId, &str, &str)],
) -> std::string::String {
    let mut line = encode(config);
    for (id, key, value) in params {
        if config.is_selected(*id) {
            line.push_str(&std::format!(" p.{}.{key}={value}", id.name()));
        }
    }
    line
}

/// Checks one `--param` (harness side): a known workload, a key of its row that the user
/// may set, a value within the row's bounds.
#[cfg(feature = "std")]
pub fn check_param(workload: &str, key: &str, value: &str) -> Result<WorkloadId, ParamRefusal> {
    let (id, spec) = lookup_param(workload, key, value)?;
    if spec.set_by == SetBy::Host {
        return Err(ParamRefusal::HostOnly(id, spec));
    }
    Ok(id)
}

#[cfg(feature = "std")]
impl ParamRefusal {
    /// What is wrong with `--param TEXT`, naming the valid keys and bounds.
    pub fn explain(&self, text: &str) -> std::string::String {
        use std::format;
        let keys = |id: WorkloadId| {
            let keys: std::vec::Vec<std::string::String> = id
                .spec()
                .params
                .iter()
                .filter(|p| p.set_by == SetBy::User)
                .map(|p| format!("{} ({}, {})", p.key, p.kind.name(), p.bounds()))
                .collect();
            if keys.is_empty() {
                format!("{} takes no parameters", id.name())
            } else {
                format!("{} takes {}", id.name(), keys.join("; "))
            }
        };
        match self {
            ParamRefusal::BadText => format!(
                "--param {text:?}: expected WORKLOAD.KEY=VALUE, the key up to {MAX_PARAM_KEY} and \
                 the value up to {MAX_PARAM_VALUE} letters, digits and - _ , : ."
            ),
            ParamRefusal::UnknownWorkload => {
                format!("--param {text:?}: no such workload (see `hvbench list`)")
            }
            ParamRefusal::UnknownKey(id) => format!("--param {text:?}: unknown key; {}", keys(*id)),
            ParamRefusal::HostOnly(id, spec) => format!(
                "--param {text:?}: {}.{} is set by hvbench itself; {}",
                id.name(),
                spec.key,
                keys(*id)
            ),
            ParamRefusal::Value(id, spec, e) => format!(
                "--param {text:?}: {}; {}.{} takes {}, {}",
                e.message(),
                id.name(),
                spec.key,
                spec.kind.name(),
                spec.bounds()
            ),
        }
    }
}

/// Builds the command line for `config` (harness side).
#[cfg(feature = "std")]
pub fn encode(config: &GuestConfig) -> std::string::String {
    use std::string::String;
    use std::vec::Vec;
    let names: Vec<&str> = config.workloads().map(|id| id.name()).collect();
    let mut line = String::from(MAGIC);
    line.push_str(" run=");
    line.push_str(&names.join(","));
    line.push_str(&std::format!(
        " samples={} warmup={} sample_us={}",
        config.samples,
        config.warmup,
        config.sample_us
    ));
    if config.markers {
        line.push_str(" markers=1");
    }
    if config.cpus != 1 {
        line.push_str(&std::format!(" cpus={}", config.cpus));
    }
    line
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut c = GuestConfig {
            samples: 7,
            warmup: 2,
            sample_us: 5000,
            ..Default::default()
        };
        c.select(WorkloadId::CpuCpuid);
        c.select(WorkloadId::IoMmioRead);
        let line = encode(&c);
        assert_eq!(
            line,
            "hvbench run=cpu.cpuid,io.mmio-read samples=7 warmup=2 sample_us=5000"
        );
        assert_eq!(parse(&line), Ok(c));
        c.cpus = 2;
        let line = encode(&c);
        assert!(line.ends_with(" cpus=2"), "{line}");
        assert_eq!(parse(&line), Ok(c));
        assert_eq!(
            parse("hvbench run=cpu.idle cpus=0"),
            Err(CmdlineError::OutOfRange)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle cpus=255"),
            Err(CmdlineError::OutOfRange)
        );
        // Markers are said only when on, and read back.
        c.markers = true;
        let line = encode(&c);
        assert!(line.contains(" markers=1"), "{line}");
        assert_eq!(parse(&line), Ok(c));
        assert_eq!(
            parse("hvbench run=cpu.idle markers=2"),
            Err(CmdlineError::OutOfRange)
        );
    }

    #[test]
    fn every_workload_fits_on_one_line() {
        let mut c = GuestConfig::default();
        for w in WORKLOADS {
            c.select(w.id);
        }
        let line = encode(&c);
        assert!(line.len() <= MAX_CMDLINE, "{}", line.len());
        assert_eq!(parse(&line), Ok(c));
    }

    #[test]
    fn rejects_bad_lines() {
        assert_eq!(parse("linux run=cpu.idle"), Err(CmdlineError::NotHvbench));
        assert_eq!(parse(""), Err(CmdlineError::NotHvbench));
        assert_eq!(parse("hvbench"), Err(CmdlineError::NothingSelected));
        assert_eq!(
            parse("hvbench run=cpu.nope"),
            Err(CmdlineError::UnknownWorkload)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle colour=red"),
            Err(CmdlineError::UnknownKey)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle samples=x"),
            Err(CmdlineError::BadNumber)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle samples=0"),
            Err(CmdlineError::OutOfRange)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle sample_us=99999999999"),
            Err(CmdlineError::BadNumber)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle bare"),
            Err(CmdlineError::UnknownKey)
        );
    }

    #[test]
    fn workload_parameters() {
        assert_eq!(
            parse("hvbench run=cpu.idle p.cpu.nope.x=1"),
            Err(CmdlineError::BadParameter)
        );
        assert_eq!(
            parse("hvbench run=cpu.idle p.cpu.idle.x=a;b"),
            Err(CmdlineError::BadParameter)
        );
        // Keys and values are the row's: unknown keys and out-of-bounds values are refused.
        assert_eq!(
            parse("hvbench run=cpu.idle p.cpu.idle.ws=64k"),
            Err(CmdlineError::BadParameter)
        );
        assert_eq!(
            parse("hvbench run=mem.tlb-chase p.mem.tlb-chase.ws=0"),
            Err(CmdlineError::BadParameter)
        );
        let mut c = GuestConfig::default();
        c.select(WorkloadId::MemTlbChase);
        let line = encode_with_params(
            &c,
            &[
                (WorkloadId::MemTlbChase, "ws", "64k,1m"),
                (WorkloadId::CpuCpuid, "x", "1"),
            ],
        );
        assert_eq!(
            line,
            "hvbench run=mem.tlb-chase samples=10 warmup=1 sample_us=10000 p.mem.tlb-chase.ws=64k,1m"
        );
        assert_eq!(parse(&line), Ok(c));
        let ws = &crate::table::param::TLB_CHASE_WS;
        let page = &crate::table::param::PAGE_SIZES;
        assert_eq!(param(&line, WorkloadId::MemTlbChase, "ws"), Some("64k,1m"));
        assert_eq!(param(&line, WorkloadId::MemTlbChase, "page"), None);
        assert_eq!(param(&line, WorkloadId::CpuCpuid, "ws"), None);
        assert_eq!(
            param_or_default(&line, WorkloadId::MemTlbChase, ws),
            Some("64k,1m")
        );
        assert_eq!(
            param_or_default(&line, WorkloadId::MemTlbChase, page),
            Some("4k,2m")
        );
    }

    #[test]
    fn check_param_refuses_unknown_keys_and_out_of_bounds_values_naming_the_valid_ones() {
        assert_eq!(
            check_param("mem.tlb-chase", "ws", "1m"),
            Ok(WorkloadId::MemTlbChase)
        );
        let refusal = |w: &str, k: &str, v: &str| {
            check_param(w, k, v)
                .map(|_| ())
                .map_err(|e| e.explain(&std::format!("{w}.{k}={v}")))
        };
        let e = refusal("mem.tlb-chase", "wss", "1m").unwrap_err();
        assert!(e.contains("unknown key") && e.contains("ws (sizes"), "{e}");
        assert!(
            e.contains("4k..=3g, a multiple of 4k, at most 16 entries"),
            "{e}"
        );
        let e = refusal("mem.tlb-chase", "ws", "0").unwrap_err();
        assert!(e.contains("out of bounds") && e.contains("4k..=3g"), "{e}");
        let e = refusal("mem.tlb-chase", "ws", "18446744073709551615").unwrap_err();
        assert!(e.contains("out of bounds"), "{e}");
        let e = refusal("mem.tlb-chase", "page", "1g").unwrap_err();
        assert!(e.contains("4k and/or 2m"), "{e}");
        let e = refusal("cpu.idle", "ws", "1m").unwrap_err();
        assert!(e.contains("cpu.idle takes no parameters"), "{e}");
        let e = refusal("mem.ksm", "seed", "3").unwrap_err();
        assert!(e.contains("set by hvbench"), "{e}");
        let e = refusal("mem.ksm", "guests", "17").unwrap_err();
        assert!(e.contains("2..=16"), "{e}");
        assert!(refusal("nope", "ws", "1m")
            .unwrap_err()
            .contains("no such workload"));
        assert!(refusal("mem.copy", "size", "a;b")
            .unwrap_err()
            .contains("letters"));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("3m"), Some(3 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("99999999999999g"), None);
    }
}
