//! The workload table: every workload's identity, in one place.
//!
//! A new workload is one [`WorkloadId`] variant, one row in [`WORKLOADS`] and one guest
//! function (the guest's dispatch `match` is exhaustive, so the compiler asks for it).
//! A row carries its parameters ([`ParamSpec`]): the harness checks `--param` against
//! them, and the guest and the host read keys and defaults from them alone.

pub use crate::params::{ParamError, ParamKind, ParamSpec, SetBy};

/// Identity of a workload. The string form (`cpu.cpuid`) is [`WorkloadId::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadId {
    CpuIdle,
    CpuRdtsc,
    CpuCpuid,
    CpuHypercall,
    CpuHypercallKernel,
    CpuMsrRead,
    CpuHlt,
    CpuCompute,
    IoPioOut,
    IoPioIn,
    IoPioOutKernel,
    IoMmioWrite,
    IoMmioRead,
    IoBlkRandread,
    IoBlkRandwrite,
    IoBlkSeqread,
    IoBlkSeqwrite,
    IoBlkFlush,
    MemFirstTouch,
    MemProtFault,
    MemTlbChase,
    MemSeqRead,
    MemCopy,
    MemPtUpdate,
    MemCr3Switch,
    MemKsm,
    MemBalloon,
    MigIdle,
    MigDirty,
    MigDirtyRandom,
    MigDirtyHot,
    SelftestTripleFault,
    SelftestPageFault,
    SelftestHang,
    SelftestBalloonCorrupt,
    VmLifecycle,
    SelftestBlkCorrupt,
    SchedIpi,
    SchedWakeup,
    SchedLockHolder,
    SchedSteal,
    SchedFairness,
}

/// Which part of the machine a workload exercises; reports group rows by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    Cpu,
    Io,
    Memory,
    /// Live migration (host-driven: the host moves the running guest).
    Migration,
    Selftest,
    /// The guest's whole life on a stack: boot, first result, destruction, host memory.
    Vm,
    /// vCPU scheduling: IPIs, timer wake-ups, steal time, fairness.
    Sched,
}

impl Group {
    pub const fn name(self) -> &'static str {
        match self {
            Group::Cpu => "cpu",
            Group::Io => "io",
            Group::Memory => "mem",
            Group::Migration => "mig",
            Group::Selftest => "selftest",
            Group::Vm => "vm",
            Group::Sched => "sched",
        }
    }
}

/// The privilege level the measured loop runs at. On `kvm_pvm` hosts CPL0 code is
/// emulated instruction by instruction, so records must carry this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// CPL0: instructions that only the kernel may execute (HLT, RDMSR, CR3 writes).
    Kernel,
    /// CPL3 with IOPL=3: everything else, so that the loop runs natively everywhere.
    User,
}

impl Privilege {
    pub const fn cpl(self) -> u8 {
        match self {
            Privilege::Kernel => 0,
            Privilege::User => 3,
        }
    }
}

/// Whether a smaller or a larger figure is the better one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Direction {
    LowerIsBetter,
    HigherIsBetter,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::LowerIsBetter => "lower_is_better",
            Direction::HigherIsBetter => "higher_is_better",
        }
    }

    /// The direction a record names; `None` for a word this version does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::LowerIsBetter, Self::HigherIsBetter]
            .into_iter()
            .find(|d| d.name() == name)
    }
}

/// The unit a metric is reported in (after the harness converts cycles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Nanoseconds per operation (from TSC cycles and the TSC frequency).
    Ns,
    /// Megabytes (10^6 bytes) per second; the guest counts bytes as operations.
    MBps,
    /// Seconds (host-measured durations).
    Seconds,
    /// Mebibytes (host-measured memory).
    MiB,
    /// A count of pages.
    Pages,
    /// A dimensionless ratio.
    Ratio,
    /// Operations (I/O requests) per second; the guest counts requests as operations.
    Iops,
}

impl Unit {
    pub const fn name(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::MBps => "MB/s",
            Unit::Seconds => "s",
            Unit::MiB => "MiB",
            Unit::Pages => "pages",
            Unit::Ratio => "ratio",
            Unit::Iops => "IOPS",
        }
    }
}

/// One figure a workload produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: &'static str,
    pub unit: Unit,
    pub direction: Direction,
}

/// The metric every latency workload reports: time per operation.
pub const LATENCY: MetricSpec = MetricSpec {
    name: "latency",
    unit: Unit::Ns,
    direction: Direction::LowerIsBetter,
};

/// The metric of bandwidth workloads: bytes per second.
pub const BANDWIDTH: MetricSpec = MetricSpec {
    name: "bandwidth",
    unit: Unit::MBps,
    direction: Direction::HigherIsBetter,
};

/// The metrics of the block workloads: requests and bytes per second over each sample,
/// and percentiles of the completion latency of the sample's requests (submission to the
/// driver seeing the used buffer), from the guest's log-bucket histogram.
pub const BLK_METRICS: &[MetricSpec] = &[
    metric("iops", Unit::Iops, Direction::HigherIsBetter),
    BANDWIDTH,
    metric("lat_p50", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p90", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p99", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p999", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_max", Unit::Ns, Direction::LowerIsBetter),
];

/// `io.blk-flush`: flushes per second (each after a 4 KiB write) and the flush's latency.
pub const BLK_FLUSH_METRICS: &[MetricSpec] = &[
    metric("iops", Unit::Iops, Direction::HigherIsBetter),
    metric("lat_p50", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p90", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p99", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_p999", Unit::Ns, Direction::LowerIsBetter),
    metric("lat_max", Unit::Ns, Direction::LowerIsBetter),
];

const fn metric(name: &'static str, unit: Unit, direction: Direction) -> MetricSpec {
    MetricSpec {
        name,
        unit,
        direction,
    }
}

/// Who drives a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    /// The guest runs it and reports samples; the host only collects them.
    Guest,
    /// The host orchestrates it (several guests, host-side measurements such as KSM
    /// sharing or balloon reclaim) with this runner of the harness.
    Host(HostRunner),
}

/// The harness's runners of host-driven workloads (`harness/src/run/host_driven.rs`
/// matches on this exhaustively: a new runner does not build until it is there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostRunner {
    /// Several guests with identical pages, Linux KSM driven from the host.
    Ksm,
    /// One guest with a balloon the host inflates and deflates.
    Balloon,
    /// One guest the host live-migrates while it runs (`mig.*`).
    Migration,
    /// Guests booted and destroyed one after another, timed and measured from the host.
    Lifecycle,
    /// Several SMP guests spinning on fewer host CPUs than vCPUs: steal time as the guest
    /// reads it against the host's run delay of each vCPU thread.
    SchedSteal,
    /// Several SMP guests in CPU cgroups of different weights: CPU share received against
    /// share entitled.
    SchedFairness,
}

/// The code a workload shares with its native twin, which the harness runs on the host
/// for a guest/native ratio (`harness/src/run/native.rs` matches on this exhaustively).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NativeTwin {
    /// [`crate::compute`]'s kernel, rounds per operation.
    Compute,
    /// [`crate::memory::chase`] over a working set, per page and page size.
    TlbChase,
    /// [`crate::memory::sum_words`] over a buffer.
    SeqRead,
    /// [`crate::memory::copy_bytes`] between two buffers.
    Copy,
    /// The host's fio on the block workloads' disk file, with the same pattern, block size,
    /// queue depth and region.
    Fio,
}

/// A hypervisor as the guest detects it from CPUID 0x40000000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hypervisor {
    Kvm,
    Xen,
    /// A hypervisor leaf with another signature (the name is reported beside it).
    Other,
    /// No hypervisor leaf: bare metal or full emulation without one (QEMU TCG).
    None,
}

impl Hypervisor {
    pub const fn name(self) -> &'static str {
        match self {
            Hypervisor::Kvm => "kvm",
            Hypervisor::Xen => "xen",
            Hypervisor::Other => "other",
            Hypervisor::None => "none",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Kvm, Self::Xen, Self::Other, Self::None]
            .into_iter()
            .find(|h| h.name() == name)
    }
}

/// Something a backend (VMM or toolstack) must provide for a workload to mean anything.
/// The harness asks the backend before it boots the guest; a missing feature is a `skip`
/// with the backend's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendFeature {
    /// An I/O port whose accesses the VMM handles in userspace ([`crate::abi::PIO_TEST_PORT`]).
    UserspacePioPort,
    /// An I/O port registered with the kernel as an ioeventfd ([`crate::abi::PIO_KERNEL_PORT`]).
    KernelIoeventfdPort,
    /// A guest-physical page the VMM emulates in userspace ([`crate::abi::MMIO_TEST_BASE`]).
    UserspaceMmioPage,
    /// HLT with interrupts off returns to the VMM at once instead of parking the vCPU.
    HltExitsToVmm,
    /// A hypercall from guest CPL0 comes back (kvm_pvm hangs in KVM_RUN unless the VMM
    /// turns off KVM's hypercall-patching quirk).
    HypercallFromKernel,
    /// The host merges identical guest pages (Linux KSM) and hvbench may drive it.
    KernelSamePageMerging,
    /// A balloon the guest can inflate and deflate (virtio-balloon, or Xen's reservation).
    Balloon,
    /// hvbench's own virtio-balloon device, whose queues the VMM validates (a guest that
    /// corrupts them must get an error, never a crashed or corrupted VMM).
    VirtioBalloon,
    /// The backend can live-migrate the running guest to a second instance of itself and
    /// pause it for a set time (the downtime ruler's calibration).
    LiveMigration,
    /// A paravirtual block device over hvbench's disk file (virtio-blk on KVM and QEMU).
    BlockDevice,
    /// hvbench's own virtio-blk, whose requests the VMM validates (a malformed chain must
    /// get an error status, never a crashed VMM or a write outside the disk or guest RAM).
    VirtioBlk,
    /// A local APIC per vCPU (IPIs, its timer) and application processors the guest
    /// starts by INIT/SIPI, as on a real machine.
    LocalApic,
    /// hvbench's own SMP VMM processes whose vCPU threads the host can see, weigh
    /// (cgroups), pin and account (schedstat); on Xen, domains whose vCPUs the toolstack
    /// weighs and accounts (`xl sched-*`, `xl vcpu-list`).
    VcpuThreads,
}

/// A condition under which a workload is valid; otherwise it is reported as `skip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Checked by the harness against the backend.
    Backend(BackendFeature),
    /// Checked by the guest: it must detect one of these hypervisors.
    OnHypervisor(&'static [Hypervisor]),
}

/// One row of the workload table.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub id: WorkloadId,
    pub name: &'static str,
    pub group: Group,
    pub privilege: Privilege,
    pub metrics: &'static [MetricSpec],
    /// One sentence on what is measured and which path it takes, on each hypervisor.
    pub description: &'static str,
    pub requires: &'static [Requirement],
    /// Runs only when named exactly (self-tests that crash or hang the guest on purpose).
    pub explicit_only: bool,
    /// The identical code the harness runs natively for a guest/native ratio, if any.
    pub native_twin: Option<NativeTwin>,
    pub driver: Driver,
    /// The parameters it takes (`--param WORKLOAD.KEY=VALUE`), the only ones it takes.
    pub params: &'static [ParamSpec],
}

impl Workload {
    /// The parameter `key` of this workload, if it takes one.
    pub fn param(&self, key: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|p| p.key == key)
    }

    /// The parameters whose values make series, in the order series names list them.
    pub fn series_params(&self) -> impl Iterator<Item = &'static ParamSpec> {
        self.params.iter().filter(|p| p.series)
    }
}

const KVM_OR_XEN: &[Hypervisor] = &[Hypervisor::Kvm, Hypervisor::Xen];

/// The parameters of the rows, one constant each, so the guest names them by value.
pub mod param {
    use super::{ParamKind, ParamSpec, SetBy};
    use crate::abi::MAX_LOW_RAM;
    use crate::params::{PAGE_2M, PAGE_4K};

    const fn spec(
        key: &'static str,
        kind: ParamKind,
        default: Option<&'static str>,
        (min, max): (u64, u64),
        description: &'static str,
    ) -> ParamSpec {
        ParamSpec {
            key,
            kind,
            default,
            min,
            max,
            multiple_of: 1,
            max_items: 1,
            series: false,
            set_by: SetBy::User,
            description,
        }
    }

    /// The guest page sizes a buffer is mapped with (`mem.first-touch`, `mem.tlb-chase`).
    pub const PAGE_SIZES: ParamSpec = ParamSpec {
        max_items: 2,
        series: true,
        ..spec(
            "page",
            ParamKind::PageSizes,
            Some("4k,2m"),
            (PAGE_4K, PAGE_2M),
            "Guest page sizes the buffer is mapped with, each a series.",
        )
    };
    pub const FIRST_TOUCH_PAGES: ParamSpec = spec(
        "pages",
        ParamKind::Count,
        Some("1024"),
        (1, 1 << 20),
        "Fresh 4 KiB pages written per sample.",
    );
    pub const PROT_FAULT_PAGES: ParamSpec = spec(
        "pages",
        ParamKind::Count,
        Some("256"),
        (1, 65_536),
        "Read-only pages written (one fault each) per sample.",
    );
    pub const TLB_CHASE_WS: ParamSpec = ParamSpec {
        multiple_of: PAGE_4K,
        max_items: 16,
        series: true,
        ..spec(
            "ws",
            ParamKind::SizeList,
            Some("16k,256k,1m,4m,16m,64m"),
            (PAGE_4K, MAX_LOW_RAM),
            "Working-set sizes chased (one element per 4 KiB page), each a series.",
        )
    };
    pub const SEQ_READ_SIZE: ParamSpec = ParamSpec {
        multiple_of: 64,
        series: true,
        ..spec(
            "size",
            ParamKind::Size,
            Some("64m"),
            (64, 2 << 30),
            "Bytes of the buffer read sequentially per pass.",
        )
    };
    pub const COPY_SIZE: ParamSpec = ParamSpec {
        series: true,
        ..spec(
            "size",
            ParamKind::Size,
            Some("32m"),
            (1, 1 << 30),
            "Bytes copied per pass (each of the two buffers holds as many).",
        )
    };
    pub const BALLOON_SIZE: ParamSpec = ParamSpec {
        multiple_of: PAGE_4K,
        ..spec(
            "size",
            ParamKind::Size,
            Some("64m"),
            (PAGE_4K, 3 << 30),
            "Bytes of the pool the guest inflates and deflates each cycle.",
        )
    };
    pub const LIFECYCLE_BOOTS: ParamSpec = spec(
        "boots",
        ParamKind::Count,
        Some("5"),
        (1, 100),
        "Guests booted and destroyed, one after another (each one sample).",
    );
    pub const KSM_GUESTS: ParamSpec = spec(
        "guests",
        ParamKind::Count,
        Some("4"),
        (2, 16),
        "Guests, each a VMM process of its own.",
    );
    pub const KSM_SIZE: ParamSpec = ParamSpec {
        multiple_of: PAGE_4K,
        ..spec(
            "size",
            ParamKind::Size,
            None,
            (PAGE_4K, MAX_LOW_RAM),
            "Bytes each guest fills, less than its RAM (default: all of its free RAM).",
        )
    };
    pub const KSM_IDENTICAL: ParamSpec = spec(
        "identical",
        ParamKind::Fraction,
        Some("0.5"),
        (0, 1_000_000),
        "Fraction of the filled pages identical across guests.",
    );
    pub const KSM_PAGES_TO_SCAN: ParamSpec = spec(
        "pages_to_scan",
        ParamKind::Count,
        Some("1000"),
        (1, 100_000),
        "KSM's pages_to_scan while the workload runs.",
    );
    pub const KSM_SLEEP_MILLISECS: ParamSpec = spec(
        "sleep_millisecs",
        ParamKind::Count,
        Some("20"),
        (0, 10_000),
        "KSM's sleep_millisecs while the workload runs.",
    );
    pub const KSM_MAX_S: ParamSpec = spec(
        "max_s",
        ParamKind::Count,
        Some("300"),
        (5, 7200),
        "Seconds to wait for the sharing to settle.",
    );
    pub const KSM_SAMPLE_MS: ParamSpec = spec(
        "sample_ms",
        ParamKind::Count,
        Some("1000"),
        (100, 10_000),
        "Milliseconds between samples of the counters.",
    );
    /// Set by the harness for each guest (1, 2, ...), so unique pages differ across guests.
    pub const KSM_SEED: ParamSpec = ParamSpec {
        set_by: SetBy::Host,
        ..spec(
            "seed",
            ParamKind::Count,
            Some("0"),
            (0, u64::MAX),
            "The guest's seed for its unique pages (set by the harness per guest).",
        )
    };
    pub const MIG_WS: ParamSpec = ParamSpec {
        multiple_of: PAGE_4K,
        ..spec(
            "ws",
            ParamKind::Size,
            Some("64m"),
            (PAGE_4K, MAX_LOW_RAM),
            "Working set the guest dirties (one 8-byte write per 4 KiB page).",
        )
    };
    /// A series: each rate is a measurement of its own (the convergence curve's x).
    pub const MIG_RATE: ParamSpec = ParamSpec {
        series: true,
        ..spec(
            "rate",
            ParamKind::Count,
            Some("0"),
            (0, 1_000_000),
            "Dirty rate in MB/s of pages (10^6 bytes), paced by the guest's TSC; 0 = as fast \
             as it can. A series.",
        )
    };
    pub const MIG_DURATION_MS: ParamSpec = spec(
        "duration_ms",
        ParamKind::Count,
        Some("4000"),
        (200, 600_000),
        "How long the guest runs its loop (guest-timed); the migration happens inside it.",
    );
    pub const MIG_BEAT_MS: ParamSpec = spec(
        "beat_ms",
        ParamKind::Count,
        Some("5"),
        (1, 1000),
        "Heartbeat interval (guest-timed): the downtime ruler's resolution.",
    );
    pub const MIG_AT_MS: ParamSpec = spec(
        "migrate_at_ms",
        ParamKind::Count,
        Some("1000"),
        (0, 600_000),
        "When the host starts the migration (or, for calibration, the pause), after the \
         guest's first heartbeat.",
    );
    pub const MIG_DOWNTIME_MS: ParamSpec = spec(
        "downtime_ms",
        ParamKind::Count,
        Some("300"),
        (1, 60_000),
        "The downtime limit given to the hypervisor (ours: --downtime-ms; QEMU: \
         downtime-limit).",
    );
    /// Set by the harness: the host's TSC rate, for a guest its hypervisor does not tell
    /// (QEMU without an invariant TSC, which it must drop to migrate).
    pub const MIG_TSC_KHZ: ParamSpec = ParamSpec {
        set_by: SetBy::Host,
        ..spec(
            "tsc_khz",
            ParamKind::Count,
            Some("0"),
            (0, 100_000_000),
            "The host's TSC rate in kHz (set by the harness; 0: the guest uses its hypervisor's).",
        )
    };
    /// Xen only (the one hypervisor whose guest sees its move: it answers the suspend).
    pub const MIG_AFTER_MOVE_MS: ParamSpec = spec(
        "after_move_ms",
        ParamKind::Count,
        Some("0"),
        (0, 600_000),
        "On Xen, where the guest answers the suspend and sees its new domain: it ends its \
         loop this long after it resumed there (0: it runs the whole duration_ms). Lets a \
         slow migration (a TCG lab) end inside a long duration_ms without waiting it out.",
    );
    pub const MIG_DIRTY: &[ParamSpec] = &[
        MIG_WS,
        MIG_RATE,
        MIG_DURATION_MS,
        MIG_BEAT_MS,
        MIG_AT_MS,
        MIG_DOWNTIME_MS,
        MIG_TSC_KHZ,
        MIG_AFTER_MOVE_MS,
    ];
    pub const MIG_IDLE: &[ParamSpec] = &[
        MIG_DURATION_MS,
        MIG_BEAT_MS,
        MIG_AT_MS,
        MIG_DOWNTIME_MS,
        MIG_TSC_KHZ,
        MIG_AFTER_MOVE_MS,
    ];
    const fn blk_bs(default: &'static str) -> ParamSpec {
        ParamSpec {
            multiple_of: 512,
            max_items: 4,
            series: true,
            ..spec(
                "bs",
                ParamKind::SizeList,
                Some(default),
                (512, 1 << 20),
                "Bytes per request (whole 512-byte sectors, at most 1m), each a series.",
            )
        }
    }
    pub const BLK_BS_RANDOM: ParamSpec = blk_bs("4k");
    pub const BLK_BS_SEQUENTIAL: ParamSpec = blk_bs("128k,1m");
    const fn blk_qd(default: &'static str) -> ParamSpec {
        ParamSpec {
            max_items: 4,
            series: true,
            ..spec(
                "qd",
                ParamKind::SizeList,
                Some(default),
                (1, 64),
                "Requests kept in flight (queue depth), each a series.",
            )
        }
    }
    pub const BLK_QD_RANDOM: ParamSpec = blk_qd("1,32");
    pub const BLK_QD_SEQUENTIAL: ParamSpec = blk_qd("1");
    pub const BLK_REGION: ParamSpec = ParamSpec {
        multiple_of: 1 << 20,
        ..spec(
            "region",
            ParamKind::Size,
            Some("64m"),
            (1 << 20, 1 << 40),
            "Bytes at the start of the disk the requests fall in (at most the disk's size).",
        )
    };
    const fn blk_random(default: &'static str) -> ParamSpec {
        spec(
            "random",
            ParamKind::Fraction,
            Some(default),
            (0, 1_000_000),
            "Access pattern: the fraction of requests at a random block of the region; the \
             rest follow the previous one (0: sequential, 1: random).",
        )
    }
    pub const BLK_RANDOM: ParamSpec = blk_random("1");
    pub const BLK_SEQUENTIAL: ParamSpec = blk_random("0");
    pub const BLK_DURATION_MS: ParamSpec = spec(
        "duration_ms",
        ParamKind::Count,
        None,
        (1, 600_000),
        "Milliseconds each sample lasts at least (default: --sample-us).",
    );
    pub const BLK_RAND: &[ParamSpec] = &[
        BLK_BS_RANDOM,
        BLK_QD_RANDOM,
        BLK_REGION,
        BLK_RANDOM,
        BLK_DURATION_MS,
    ];
    pub const BLK_SEQ: &[ParamSpec] = &[
        BLK_BS_SEQUENTIAL,
        BLK_QD_SEQUENTIAL,
        BLK_REGION,
        BLK_SEQUENTIAL,
        BLK_DURATION_MS,
    ];
    pub const BLK_FLUSH: &[ParamSpec] = &[BLK_REGION, BLK_DURATION_MS];

    pub const IPI_BACK: ParamSpec = spec(
        "ipi_back",
        ParamKind::Count,
        Some("1"),
        (0, 1),
        "1: the AP answers with an IPI of its own, which the boot vCPU takes at CPL0 with \
         interrupts on; 0: the AP's memory write is the answer, seen at CPL3.",
    );
    pub const WAKEUP_DELAY_US: ParamSpec = spec(
        "delay_us",
        ParamKind::Count,
        Some("100"),
        (1, 1_000_000),
        "Microseconds from arming the timer to its deadline.",
    );
    pub const LOCK_HOLD: ParamSpec = spec(
        "hold",
        ParamKind::Count,
        Some("200"),
        (1, 1_000_000),
        "Iterations of work inside the lock per acquisition.",
    );
    pub const SPIN_GUESTS: ParamSpec = spec(
        "guests",
        ParamKind::Count,
        Some("2"),
        (2, 8),
        "Guests run at once, each a VMM process of its own.",
    );
    pub const SPIN_VCPUS: ParamSpec = spec(
        "vcpus",
        ParamKind::Count,
        Some("2"),
        (1, 8),
        "vCPUs of each guest, every one spinning.",
    );
    pub const SPIN_DURATION_S: ParamSpec = spec(
        "duration_s",
        ParamKind::Count,
        Some("10"),
        (2, 600),
        "Seconds the guests spin.",
    );
    pub const SPIN_WINDOW_MS: ParamSpec = spec(
        "window_ms",
        ParamKind::Count,
        Some("500"),
        (50, 10_000),
        "Milliseconds of each short window (the guests report, the host samples).",
    );
    pub const SPIN_PIN: ParamSpec = spec(
        "pin",
        ParamKind::Count,
        Some("0"),
        (0, 1024),
        "Pin every vCPU thread to host CPUs 0..pin-1 (0: no pinning).",
    );
    pub const FAIRNESS_RATIO: ParamSpec = ParamSpec {
        series: true,
        ..spec(
            "ratio",
            ParamKind::Count,
            Some("2"),
            (1, 64),
            "Weight of the odd-numbered guests (the even-numbered ones weigh 1); a series.",
        )
    };
    pub const FAIRNESS_CAPPED: ParamSpec = ParamSpec {
        series: true,
        ..spec(
            "capped",
            ParamKind::Count,
            Some("0"),
            (0, 1),
            "1: each guest is also capped at its entitled share (cpu.max / cfs_quota); a \
             series.",
        )
    };
    pub const FAIRNESS_XEN_CREDIT: ParamSpec = spec(
        "xen_credit",
        ParamKind::Count,
        Some("0"),
        (0, 1),
        "Xen only: the scheduler of the cpupool the guests run in (hvbench's own, one \
         physical CPU taken from Pool-0 and given back): 0 credit2, 1 credit.",
    );
    pub const STEAL: &[ParamSpec] = &[
        SPIN_GUESTS,
        SPIN_VCPUS,
        SPIN_DURATION_S,
        SPIN_WINDOW_MS,
        SPIN_PIN,
    ];
    pub const FAIRNESS: &[ParamSpec] = &[
        SPIN_GUESTS,
        SPIN_VCPUS,
        SPIN_DURATION_S,
        SPIN_WINDOW_MS,
        SPIN_PIN,
        FAIRNESS_RATIO,
        FAIRNESS_CAPPED,
        FAIRNESS_XEN_CREDIT,
    ];
    pub const KSM: &[ParamSpec] = &[
        KSM_GUESTS,
        KSM_SIZE,
        KSM_IDENTICAL,
        KSM_PAGES_TO_SCAN,
        KSM_SLEEP_MILLISECS,
        KSM_MAX_S,
        KSM_SAMPLE_MS,
        KSM_SEED,
    ];
}

/// What every `mig.*` record measures.
const MIG_METRICS: &[MetricSpec] = &[
    metric("downtime", Unit::Seconds, Direction::LowerIsBetter),
    metric(
        "downtime_hypervisor",
        Unit::Seconds,
        Direction::LowerIsBetter,
    ),
    metric("total_time", Unit::Seconds, Direction::LowerIsBetter),
    metric("slowdown", Unit::Ratio, Direction::LowerIsBetter),
];

const MIG_REQUIRES: &[Requirement] = &[Requirement::Backend(BackendFeature::LiveMigration)];

const fn mig_row(
    id: WorkloadId,
    name: &'static str,
    description: &'static str,
    params: &'static [ParamSpec],
) -> Workload {
    Workload {
        id,
        name,
        group: Group::Migration,
        privilege: Privilege::User,
        metrics: MIG_METRICS,
        description,
        requires: MIG_REQUIRES,
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::Migration),
        params,
    }
}

/// Every workload hvbench knows, in the order a full run executes them.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        id: WorkloadId::CpuIdle,
        name: "cpu.idle",
        group: Group::Cpu,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "Two back-to-back serialised TSC reads with nothing between them: the \
                      measurement floor under every other figure.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuRdtsc,
        name: "cpu.rdtsc",
        group: Group::Cpu,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "RDTSC at CPL3. Neither KVM nor Xen intercepts it by default, so this is \
                      the native instruction unless the hypervisor traps the TSC.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuCpuid,
        name: "cpu.cpuid",
        group: Group::Cpu,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "CPUID leaf 0 at CPL3: an unconditional exit, emulated inside the \
                      hypervisor (KVM's kernel module, or Xen) without reaching any VMM.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuHypercall,
        name: "cpu.hypercall",
        group: Group::Cpu,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "VMCALL (Intel) or VMMCALL (AMD) at CPL3: the exit and the hypervisor's \
                      hypercall entry, which refuses calls from CPL3 (KVM returns -KVM_EPERM, \
                      Xen -EPERM) without running them. The minimal hypercall round trip, the \
                      same path on KVM and Xen.",
        requires: &[Requirement::OnHypervisor(KVM_OR_XEN)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuHypercallKernel,
        name: "cpu.hypercall-kernel",
        group: Group::Cpu,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "A no-op hypercall from CPL0 that the hypervisor executes: \
                      KVM_HC_VAPIC_POLL_IRQ on KVM, xen_version(XENVER_version) on Xen, both \
                      answered in the hypervisor without reaching a VMM.",
        requires: &[
            Requirement::OnHypervisor(KVM_OR_XEN),
            Requirement::Backend(BackendFeature::HypercallFromKernel),
        ],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuMsrRead,
        name: "cpu.msr-read",
        group: Group::Cpu,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "RDMSR of IA32_APIC_BASE (0x1b) at CPL0: intercepted by KVM and by Xen \
                      and emulated inside the hypervisor.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuHlt,
        name: "cpu.hlt",
        group: Group::Cpu,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "HLT at CPL0 with interrupts off; the VMM sees the HLT exit and resumes \
                      the vCPU at once: a round trip from the guest to the VMM process.",
        requires: &[Requirement::Backend(BackendFeature::HltExitsToVmm)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::CpuCompute,
        name: "cpu.compute",
        group: Group::Cpu,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "A deterministic integer kernel (xorshift and multiply mixing over 4 KiB) \
                      at CPL3, checksum verified by the host; the host runs the identical code \
                      natively and the record gives the guest/native ratio.",
        requires: &[],
        explicit_only: false,
        native_twin: Some(NativeTwin::Compute),
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoPioOut,
        name: "io.pio-out",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "OUT to an I/O port the VMM handles in userspace: an exit from the guest \
                      through the kernel to the VMM process and back.",
        requires: &[Requirement::Backend(BackendFeature::UserspacePioPort)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoPioIn,
        name: "io.pio-in",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "IN from an I/O port the VMM handles in userspace: the same round trip \
                      as io.pio-out, with the value supplied by the VMM.",
        requires: &[Requirement::Backend(BackendFeature::UserspacePioPort)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoPioOutKernel,
        name: "io.pio-out-kernel",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "OUT to an I/O port registered as an ioeventfd: the kernel signals an \
                      eventfd and resumes the guest without returning to the VMM.",
        requires: &[Requirement::Backend(BackendFeature::KernelIoeventfdPort)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoMmioWrite,
        name: "io.mmio-write",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "A 32-bit store to a guest-physical page with no memory behind it, which \
                      the VMM emulates in userspace: an MMIO exit (instruction decode in the \
                      kernel) to the VMM and back.",
        requires: &[Requirement::Backend(BackendFeature::UserspaceMmioPage)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoMmioRead,
        name: "io.mmio-read",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "A 32-bit load from the page of io.mmio-write; the VMM supplies the value.",
        requires: &[Requirement::Backend(BackendFeature::UserspaceMmioPage)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::IoBlkRandread,
        name: "io.blk-randread",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: BLK_METRICS,
        description: "Random reads of `bs` bytes at queue depth `qd` from hvbench's disk file \
                      through the paravirtual block device (virtio-blk on KVM and QEMU; the \
                      driver polls the used ring, no interrupts), over `region` bytes: IOPS, \
                      MB/s and completion-latency percentiles. Host fio on the same file is \
                      the native baseline. Parameters `bs`, `qd`, `region`, `random`.",
        requires: &[Requirement::Backend(BackendFeature::BlockDevice)],
        explicit_only: false,
        native_twin: Some(NativeTwin::Fio),
        driver: Driver::Guest,
        params: param::BLK_RAND,
    },
    Workload {
        id: WorkloadId::IoBlkRandwrite,
        name: "io.blk-randwrite",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: BLK_METRICS,
        description: "Random writes of `bs` bytes at queue depth `qd`, as io.blk-randread; \
                      the guest writes a pattern derived from each byte's offset and reads \
                      the blocks back to verify them afterwards. Parameters `bs`, `qd`, \
                      `region`, `random`.",
        requires: &[Requirement::Backend(BackendFeature::BlockDevice)],
        explicit_only: false,
        native_twin: Some(NativeTwin::Fio),
        driver: Driver::Guest,
        params: param::BLK_RAND,
    },
    Workload {
        id: WorkloadId::IoBlkSeqread,
        name: "io.blk-seqread",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: BLK_METRICS,
        description: "Sequential reads of `bs` bytes (128 KiB and 1 MiB) at queue depth `qd`, \
                      wrapping at `region`, as io.blk-randread. Parameters `bs`, `qd`, \
                      `region`, `random`.",
        requires: &[Requirement::Backend(BackendFeature::BlockDevice)],
        explicit_only: false,
        native_twin: Some(NativeTwin::Fio),
        driver: Driver::Guest,
        params: param::BLK_SEQ,
    },
    Workload {
        id: WorkloadId::IoBlkSeqwrite,
        name: "io.blk-seqwrite",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: BLK_METRICS,
        description: "Sequential writes of `bs` bytes (128 KiB and 1 MiB) at queue depth `qd`, \
                      verified afterwards as io.blk-randwrite. Parameters `bs`, `qd`, \
                      `region`, `random`.",
        requires: &[Requirement::Backend(BackendFeature::BlockDevice)],
        explicit_only: false,
        native_twin: Some(NativeTwin::Fio),
        driver: Driver::Guest,
        params: param::BLK_SEQ,
    },
    Workload {
        id: WorkloadId::IoBlkFlush,
        name: "io.blk-flush",
        group: Group::Io,
        privilege: Privilege::User,
        metrics: BLK_FLUSH_METRICS,
        description: "A 4 KiB write then a flush (VIRTIO_BLK_T_FLUSH: fdatasync on our VMM, \
                      QEMU's flush to the file), one at a time: flushes per second and the \
                      flush's own completion latency. Parameter `region`.",
        requires: &[Requirement::Backend(BackendFeature::BlockDevice)],
        explicit_only: false,
        native_twin: Some(NativeTwin::Fio),
        driver: Driver::Guest,
        params: param::BLK_FLUSH,
    },
    Workload {
        id: WorkloadId::MemFirstTouch,
        name: "mem.first-touch",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "First write to guest pages never touched before, mapped by the guest with \
                      4 KiB or 2 MiB pages (series `page`): on KVM the host allocates the page \
                      and fills the EPT/NPT or shadow entry; Xen populates memory when it builds \
                      the domain, so there only the guest's own TLB fill remains. Parameter \
                      `pages` (per sample).",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[param::FIRST_TOUCH_PAGES, param::PAGE_SIZES],
    },
    Workload {
        id: WorkloadId::MemProtFault,
        name: "mem.prot-fault",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "Write from CPL3 to a page the guest made read-only: the #PF goes to the \
                      guest kernel (through the hypervisor under shadow paging), whose CPL0 \
                      handler makes the page writable again and returns. Parameter `pages`.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[param::PROT_FAULT_PAGES],
    },
    Workload {
        id: WorkloadId::MemTlbChase,
        name: "mem.tlb-chase",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[LATENCY],
        description: "Random pointer chase with one element per 4 KiB page, over a sweep of \
                      working-set sizes (series `ws`), mapped with 4 KiB or 2 MiB guest pages \
                      (series `page`): TLB reach and the cost of the 2D (EPT/NPT) or shadow \
                      page walk. Identical code runs natively. Parameters `ws`, `page`.",
        requires: &[],
        explicit_only: false,
        native_twin: Some(NativeTwin::TlbChase),
        driver: Driver::Guest,
        params: &[param::TLB_CHASE_WS, param::PAGE_SIZES],
    },
    Workload {
        id: WorkloadId::MemSeqRead,
        name: "mem.seq-read",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[BANDWIDTH],
        description: "Sequential read bandwidth over a buffer mapped with 2 MiB guest pages. \
                      Identical code runs natively. Parameter `size`.",
        requires: &[],
        explicit_only: false,
        native_twin: Some(NativeTwin::SeqRead),
        driver: Driver::Guest,
        params: &[param::SEQ_READ_SIZE],
    },
    Workload {
        id: WorkloadId::MemCopy,
        name: "mem.copy",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[BANDWIDTH],
        description: "Memory copy bandwidth (bytes copied per second) between two buffers mapped \
                      with 2 MiB guest pages. Identical code runs natively. Parameter `size`.",
        requires: &[],
        explicit_only: false,
        native_twin: Some(NativeTwin::Copy),
        driver: Driver::Guest,
        params: &[param::COPY_SIZE],
    },
    Workload {
        id: WorkloadId::MemPtUpdate,
        name: "mem.pt-update",
        group: Group::Memory,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "The guest rewrites one of its own page-table entries, invalidates it with \
                      INVLPG and touches the page, at CPL0: shadow paging's costly case (the \
                      write traps to the hypervisor), a plain store under EPT/NPT.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::MemCr3Switch,
        name: "mem.cr3-switch",
        group: Group::Memory,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "MOV to CR3 between two address spaces at CPL0 (HyperBench's set-cr3): an \
                      exit under shadow paging, a native instruction under EPT/NPT.",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::MemKsm,
        name: "mem.ksm",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[
            metric("time_to_90", Unit::Seconds, Direction::LowerIsBetter),
            metric("saved_pss", Unit::MiB, Direction::HigherIsBetter),
            metric("saved_ksm", Unit::MiB, Direction::HigherIsBetter),
            metric("pages_merged", Unit::Pages, Direction::HigherIsBetter),
            metric("ksmd_cpu", Unit::Seconds, Direction::LowerIsBetter),
            metric("write_merged", Unit::Ns, Direction::LowerIsBetter),
            metric("write_unmerged", Unit::Ns, Direction::LowerIsBetter),
        ],
        description: "Kernel samepage merging across several guests (separate VMM processes \
                      whose RAM is MADV_MERGEABLE) that fill their memory partly with pages \
                      identical across guests. hvbench starts KSM with stated settings, samples \
                      /sys/kernel/mm/ksm and the VMMs' procfs until the guests' merged pages \
                      stop changing, and records the sharing curves, the time to 90% of the \
                      final merged count, the guests' pages merged, the host memory saved (the \
                      VMMs' summed PSS before minus after: saved_pss; KSM's pages_sharing gain \
                      times 4 KiB: saved_ksm, only where no other process's pages merged \
                      meanwhile), ksmd's CPU time, and the first write to a merged page \
                      (copy-on-write through the hypervisor) against one to an unmerged page. \
                      KVM only (KSM is a Linux feature). Parameters `guests`, `size`, \
                      `identical`, `pages_to_scan`, `sleep_millisecs`, `max_s`, `sample_ms`; \
                      guest RAM is --memory-mib.",
        requires: &[Requirement::Backend(BackendFeature::KernelSamePageMerging)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::Ksm),
        params: param::KSM,
    },
    Workload {
        id: WorkloadId::MemBalloon,
        name: "mem.balloon",
        group: Group::Memory,
        privilege: Privilege::User,
        metrics: &[
            metric("inflate", Unit::MBps, Direction::HigherIsBetter),
            metric("reclaimed", Unit::Ratio, Direction::HigherIsBetter),
            metric("deflate", Unit::MBps, Direction::HigherIsBetter),
            metric("touch_after_deflate", Unit::Ns, Direction::LowerIsBetter),
        ],
        description: "Ballooning driven by the host: it sets a target (virtio-balloon's \
                      num_pages on KVM, `xl mem-set` on Xen), the guest hands the pages back in \
                      1 MiB requests (the virtio inflate queue, whose VMM drops them with \
                      MADV_DONTNEED; XENMEM_decrease_reservation on Xen), then takes them again \
                      (deflate queue; XENMEM_populate_physmap) and touches them. Inflate and \
                      deflate rates (guest-timed), the share of the inflated size the host \
                      got back (KVM: resident pages of guest RAM; Xen: the domain's memory in \
                      `xl list`), the cost per page of the first touch after deflating. \
                      Parameter `size` (default 64m).",
        requires: &[Requirement::Backend(BackendFeature::Balloon)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::Balloon),
        params: &[param::BALLOON_SIZE],
    },
    mig_row(
        WorkloadId::MigIdle,
        "mig.idle",
        "Live migration of a guest that only beats (a heartbeat line every `beat_ms`, \
         guest-timed, which the host timestamps on arrival): the floor of downtime and total \
         time. Downtime = the largest gap between heartbeats minus the interval (resolution: \
         the interval), beside the hypervisor's own figure; total time; the guest's memory \
         check.",
        param::MIG_IDLE,
    ),
    mig_row(
        WorkloadId::MigDirty,
        "mig.dirty",
        "Live migration while the guest at CPL3 rewrites one word of each page of a `ws` \
         working set in order at `rate` MB/s (0: flat out), counting pages written per \
         heartbeat before, during and after; it keeps a checksum of the working set as it \
         writes and checks it against memory at the end. Downtime (heartbeat gap and the \
         hypervisor's own), total time, rounds and bytes, slowdown.",
        param::MIG_DIRTY,
    ),
    mig_row(
        WorkloadId::MigDirtyRandom,
        "mig.dirty-random",
        "As mig.dirty, the pages chosen at random over the working set.",
        param::MIG_DIRTY,
    ),
    mig_row(
        WorkloadId::MigDirtyHot,
        "mig.dirty-hot",
        "As mig.dirty, the pages chosen at random from a hot eighth of the working set \
         (the writes pile onto few pages: fewer to resend each round).",
        param::MIG_DIRTY,
    ),
    Workload {
        id: WorkloadId::SelftestTripleFault,
        name: "selftest.triple-fault",
        group: Group::Selftest,
        privilege: Privilege::Kernel,
        metrics: &[],
        description: "Loads an empty IDT and faults: the host must report a crash (triple \
                      fault) and carry on with the next workload.",
        requires: &[],
        explicit_only: true,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::SelftestPageFault,
        name: "selftest.page-fault",
        group: Group::Selftest,
        privilege: Privilege::User,
        metrics: &[],
        description: "Reads an unmapped address at CPL3: the guest must report the page fault \
                      (vector, RIP, CR2) as a crash, and the run carries on.",
        requires: &[],
        explicit_only: true,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::SelftestHang,
        name: "selftest.hang",
        group: Group::Selftest,
        privilege: Privilege::User,
        metrics: &[],
        description: "Spins forever: the host must time out, stop the guest and carry on \
                      with the next workload.",
        requires: &[],
        explicit_only: true,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::SelftestBalloonCorrupt,
        name: "selftest.balloon-corrupt",
        group: Group::Selftest,
        privilege: Privilege::User,
        metrics: &[],
        description: "Sends the VMM's virtio-balloon malformed requests (a head index outside \
                      the queue, a buffer or a PFN outside guest RAM, a broken chain, a \
                      write-only buffer, a ragged length): the VMM must refuse each without \
                      releasing any page, the record must be an error naming what it refused, \
                      and the device must work again after a reset.",
        requires: &[Requirement::Backend(BackendFeature::VirtioBalloon)],
        explicit_only: true,
        native_twin: None,
        driver: Driver::Host(HostRunner::Balloon),
        params: &[],
    },
    Workload {
        id: WorkloadId::VmLifecycle,
        name: "vm.lifecycle",
        group: Group::Vm,
        privilege: Privilege::User,
        metrics: &[
            metric("define_to_result", Unit::Seconds, Direction::LowerIsBetter),
            metric("destroy", Unit::Seconds, Direction::LowerIsBetter),
            metric("vmm_rss", Unit::MiB, Direction::LowerIsBetter),
            metric("vmm_pss", Unit::MiB, Direction::LowerIsBetter),
            metric("stack_pss", Unit::MiB, Direction::LowerIsBetter),
        ],
        description: "The guest's life as the host sees it, `boots` times: from asking the \
                      backend for a guest (VMM start, QEMU start, `virsh create`) to the \
                      guest's first result line; the VMM process's RSS and PSS then; the PSS \
                      of the whole stack (the VMM plus management daemons: libvirtd, \
                      virtqemud, virtlogd); and how long destroying the guest takes (VMM \
                      stop, QEMU kill, `virsh destroy`).",
        requires: &[],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::Lifecycle),
        params: &[param::LIFECYCLE_BOOTS],
    },
    Workload {
        id: WorkloadId::SelftestBlkCorrupt,
        name: "selftest.blk-corrupt",
        group: Group::Selftest,
        privilege: Privilege::User,
        metrics: &[],
        description: "Sends the VMM's virtio-blk malformed requests (sectors past the disk, a \
                      buffer outside guest RAM, a ragged or oversized length, a buffer of the \
                      wrong direction, a bad header, an unknown type, a chain without a status \
                      byte): each must be refused with IOERR/UNSUPP (or DEVICE_NEEDS_RESET), \
                      the disk must be unchanged, the device must serve a good request after; \
                      the record is an error naming what was refused.",
        requires: &[Requirement::Backend(BackendFeature::VirtioBlk)],
        explicit_only: true,
        native_twin: None,
        driver: Driver::Guest,
        params: &[],
    },
    Workload {
        id: WorkloadId::SchedIpi,
        name: "sched.ipi",
        group: Group::Sched,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "IPI round trip between two vCPUs: the boot vCPU writes a sequence \
                      number and the ICR; the application processor, halted in its kernel, \
                      takes the interrupt, copies the number back and sends it back with an \
                      IPI of its own, which the boot vCPU takes in its kernel, spinning \
                      with interrupts on until its handler saw the number (kvm-unit-tests' \
                      `ipi`, both ways). `ipi_back=0`: the AP's write is the answer, seen \
                      by the boot vCPU spinning at CPL3. On KVM this is the in-kernel LAPIC \
                      plus the wake-up of a halted vCPU thread by the host scheduler. Needs \
                      2 vCPUs; kernel code runs emulated on kvm_pvm.",
        requires: &[Requirement::Backend(BackendFeature::LocalApic)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[param::IPI_BACK],
    },
    Workload {
        id: WorkloadId::SchedWakeup,
        name: "sched.wakeup",
        group: Group::Sched,
        privilege: Privilege::Kernel,
        metrics: &[LATENCY],
        description: "A vCPU arms its local APIC's TSC-deadline timer `delay_us` ahead (where \
                      CPUID lacks it, as for Xen PVH in the lab: one-shot mode at a rate \
                      measured against the TSC; notes.timer says which) and \
                      halts (STI; HLT at CPL0); the figure is the time from the deadline to \
                      the instruction after HLT (the timer's expiry in the hypervisor, the \
                      host scheduler waking the vCPU thread, the interrupt's delivery and \
                      handler). CPL0, so on kvm_pvm the handler and the reads are emulated.",
        requires: &[Requirement::Backend(BackendFeature::LocalApic)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[param::WAKEUP_DELAY_US],
    },
    Workload {
        id: WorkloadId::SchedLockHolder,
        name: "sched.lock-holder",
        group: Group::Sched,
        privilege: Privilege::User,
        metrics: &[
            metric("acquire", Unit::Ns, Direction::LowerIsBetter),
            metric("acquire_max", Unit::Ns, Direction::LowerIsBetter),
        ],
        description: "Every vCPU of the guest contends for one spinlock at CPL3, holding it \
                      for `hold` iterations of work: the boot vCPU's mean time to acquire \
                      (`acquire`) and the longest single acquire of each sample \
                      (`acquire_max`, the tail where a descheduled holder shows). Overcommit \
                      comes from --vcpus above the host's CPUs; the record notes \
                      acquisitions per second of all vCPUs.",
        requires: &[Requirement::Backend(BackendFeature::LocalApic)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Guest,
        params: &[param::LOCK_HOLD],
    },
    Workload {
        id: WorkloadId::SchedSteal,
        name: "sched.steal",
        group: Group::Sched,
        privilege: Privilege::User,
        metrics: &[
            metric("steal_guest", Unit::Seconds, Direction::LowerIsBetter),
            metric("steal_host", Unit::Seconds, Direction::LowerIsBetter),
            metric("steal_disagreement", Unit::Ratio, Direction::LowerIsBetter),
        ],
        description: "`guests` SMP guests (VMM processes) whose every vCPU spins at CPL3, on \
                      fewer host CPUs than vCPUs: each vCPU's steal time as KVM reports it \
                      to the guest (the steal-time MSR's area) against the host's own view, \
                      the run delay of the vCPU thread (/proc/PID/task/TID/schedstat), over \
                      the same span; samples are per vCPU, the disagreement is |guest/host - \
                      1| of the sums. hvbench's VMM and QEMU with -accel kvm (one process \
                      per guest, vCPU threads found by name).",
        requires: &[Requirement::Backend(BackendFeature::VcpuThreads)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::SchedSteal),
        params: param::STEAL,
    },
    Workload {
        id: WorkloadId::SchedFairness,
        name: "sched.fairness",
        group: Group::Sched,
        privilege: Privilege::User,
        metrics: &[
            metric("share_error", Unit::Ratio, Direction::LowerIsBetter),
            metric("jain", Unit::Ratio, Direction::HigherIsBetter),
            metric("worst_window_share", Unit::Ratio, Direction::HigherIsBetter),
        ],
        description: "`guests` SMP guests spinning on every vCPU, each VMM process in a CPU \
                      cgroup of its own weighted 1 or `ratio` (cgroup v2 cpu.weight, v1 \
                      cpu.shares; with `capped`, also cpu.max / cfs_quota at its entitled \
                      share): the CPU time of each guest's vCPU threads per window against \
                      its entitled share. share_error: the largest |received/entitled - 1| \
                      over the run; jain: Jain's index of received/entitled; \
                      worst_window_share: the smallest received/entitled of any guest in \
                      any window. Curves: each guest's share over time.",
        requires: &[Requirement::Backend(BackendFeature::VcpuThreads)],
        explicit_only: false,
        native_twin: None,
        driver: Driver::Host(HostRunner::SchedFairness),
        params: param::FAIRNESS,
    },
];

impl WorkloadId {
    /// The table row of this workload.
    pub fn spec(self) -> &'static Workload {
        // Row i is the variant with discriminant i; `table_has_one_row_per_id` checks it.
        &WORKLOADS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn from_name(name: &str) -> Option<Self> {
        WORKLOADS.iter().find(|w| w.name == name).map(|w| w.id)
    }
}

/// A glob over workload names: `*` matches any run of characters, `?` one character.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_id() {
        for (i, w) in WORKLOADS.iter().enumerate() {
            assert_eq!(w.id as usize, i, "{} is out of order", w.name);
            assert_eq!(w.id.spec().name, w.name);
            assert_eq!(WorkloadId::from_name(w.name), Some(w.id));
        }
        assert_eq!(WORKLOADS.len(), WorkloadId::SchedFairness as usize + 1);
    }

    #[test]
    fn names_are_group_prefixed_and_protocol_safe() {
        for w in WORKLOADS {
            let (group, rest) = w.name.split_once('.').expect("group.name");
            assert_eq!(group, w.group.name(), "{}", w.name);
            assert!(!rest.is_empty());
            assert!(w
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'));
            assert!(!w.description.is_empty());
            assert_eq!(w.explicit_only, w.group == Group::Selftest, "{}", w.name);
        }
    }

    #[test]
    fn every_parameter_default_parses_within_its_bounds() {
        for w in WORKLOADS {
            for (i, p) in w.params.iter().enumerate() {
                assert!(
                    w.params[..i].iter().all(|q| q.key != p.key),
                    "{}.{} twice",
                    w.name,
                    p.key
                );
                assert!(p.min <= p.max && p.multiple_of >= 1, "{}.{}", w.name, p.key);
                assert!(p.max_items >= 1 && (p.max_items == 1 || p.kind.is_list()));
                assert!(!p.description.is_empty());
                assert!(!p.key.is_empty() && p.key.len() <= crate::cmdline::MAX_PARAM_KEY);
                if let Some(default) = p.default {
                    assert!(
                        p.check(default).is_ok(),
                        "{}.{}={default}: {:?}",
                        w.name,
                        p.key,
                        p.check(default)
                    );
                    assert!(default.len() <= crate::cmdline::MAX_PARAM_VALUE);
                }
                if p.series {
                    assert!(p.default.is_some(), "a series parameter needs a default");
                }
            }
        }
    }

    #[test]
    fn glob() {
        assert!(glob_matches("cpu.*", "cpu.cpuid"));
        assert!(glob_matches("*", "io.pio-in"));
        assert!(glob_matches("io.pio-*", "io.pio-out-kernel"));
        assert!(glob_matches("cpu.?dle", "cpu.idle"));
        assert!(glob_matches("*.hlt", "cpu.hlt"));
        assert!(!glob_matches("cpu.*", "io.pio-in"));
        assert!(!glob_matches("cpu.cpuid", "cpu.cpuid2"));
        assert!(!glob_matches("cpu.cpuid2", "cpu.cpuid"));
        assert!(glob_matches("*a*b*", "xxaxxbxx"));
        assert!(!glob_matches("*a*b", "xxaxxbxx"));
    }
}
