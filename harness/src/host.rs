//! The host fingerprint: what kind of machine produced a figure. Every record carries it,
//! because a number from a nested or emulated host means something else than one from
//! bare metal.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use procfs::Current;
use reports::host::{Class, Cpl0, HostClass};
use reports::record::HostInfo;

use crate::host_paging::KvmFingerprint;

pub(crate) use hostutil::read_trimmed;

/// The selected value of a sysfs choice file such as `always [madvise] never`.
fn bracketed(text: &str) -> String {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or(text)
        .to_string()
}

/// The KVM vendor module in use, the paging mode it gives guests and how guest CPL0 code
/// runs.
pub fn kvm_paging() -> KvmFingerprint {
    crate::host_paging::read_kvm_paging(&crate::host_paging::HostPaths::system()).fingerprint()
}

/// The host's class: what kind of machine the figures come from.
///
/// QEMU names its TCG CPU models after the translator ("QEMU TCG CPU version ..."): on
/// such a host every instruction, a KVM guest's included, is emulated, so the figures
/// are emulation artefacts whatever the paging mode.
pub fn classify(
    kvm_module: &str,
    cpu_model: &str,
    hypervisor_flag: bool,
    vmx_or_svm: bool,
) -> HostClass {
    if kvm_module == "kvm_pvm" {
        HostClass::Pvm
    } else if cpu_model.contains("TCG") {
        HostClass::NestedTcg
    } else if !hypervisor_flag {
        HostClass::BareMetal
    } else if vmx_or_svm {
        HostClass::Nested
    } else {
        HostClass::VmWithoutKvm
    }
}

/// Measures the TSC rate against CLOCK_MONOTONIC_RAW over `span`.
pub fn measure_tsc_khz(span: Duration) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC only reads the time stamp counter.
        let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
        let start = Instant::now();
        let c0 = rdtsc();
        while start.elapsed() < span {
            std::hint::spin_loop();
        }
        let c1 = rdtsc();
        let ns = start.elapsed().as_nanos() as f64;
        if ns <= 0.0 || c1 <= c0 {
            return None;
        }
        let khz = ((c1 - c0) as f64 / ns * 1e6).round();
        // Finite and positive (c1 > c0, ns > 0); `as` saturates at u64::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(khz as u64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = span;
        None
    }
}

/// Fingerprints this machine.
pub fn fingerprint() -> HostInfo {
    let cpuinfo = procfs::CpuInfo::current().ok();
    let field = |name: &str| {
        cpuinfo
            .as_ref()
            .and_then(|c| c.get_field(0, name).map(str::to_string))
            .unwrap_or_default()
    };
    let flags: Vec<String> = cpuinfo
        .as_ref()
        .and_then(|c| {
            c.flags(0)
                .map(|f| f.iter().map(|s| s.to_string()).collect())
        })
        .unwrap_or_default();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let (vmx, svm, hypervisor_flag) = (has("vmx"), has("svm"), has("hypervisor"));
    let kvm = kvm_paging();
    let cpu_model = field("model name");
    let class = classify(kvm.module, &cpu_model, hypervisor_flag, vmx || svm);
    let cpl0 = if class == HostClass::NestedTcg {
        // QEMU's translator runs the guest's kernel code, as it does everything else.
        Some(Cpl0::Emulated)
    } else {
        kvm.cpl0
    };
    let uname = nix::sys::utsname::uname().ok();
    let uname_field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname
            .as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let memory_mib = procfs::Meminfo::current()
        .map(|m| m.mem_total / (1024 * 1024))
        .unwrap_or(0);
    let mut extra = BTreeMap::new();
    for (key, path) in [
        (
            "cpufreq_governor",
            "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
        ),
        ("kvm_tdp_mmu", "/sys/module/kvm/parameters/tdp_mmu"),
        ("ksm_pages_to_scan", "/sys/kernel/mm/ksm/pages_to_scan"),
        ("ksm_sleep_millisecs", "/sys/kernel/mm/ksm/sleep_millisecs"),
    ] {
        if let Some(v) = read_trimmed(path) {
            extra.insert(key.to_string(), v);
        }
    }
    extra.insert("constant_tsc".into(), has("constant_tsc").to_string());
    extra.insert("dev_kvm".into(), Path::new("/dev/kvm").exists().to_string());
    let tsc_khz = measure_tsc_khz(Duration::from_millis(50));
    HostInfo {
        class: Class::of(class).to_string(),
        hostname: uname_field(|u| u.nodename()),
        cpu_vendor: field("vendor_id"),
        cpu_model,
        cpus: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        memory_mib,
        vmx,
        svm,
        hypervisor_flag,
        kernel: format!(
            "{} {}",
            uname_field(|u| u.release()),
            uname_field(|u| u.version())
        ),
        kvm_module: kvm.module.to_string(),
        paging: kvm.paging.unwrap_or_default().to_string(),
        cpl0: cpl0.map_or("", Cpl0::name).to_string(),
        tsc_khz,
        tsc_source: if tsc_khz.is_some() {
            "measured against CLOCK_MONOTONIC_RAW over 50 ms".into()
        } else {
            "unavailable".into()
        },
        thp: read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled")
            .map(|s| bracketed(&s))
            .unwrap_or_default(),
        ksm: read_trimmed("/sys/kernel/mm/ksm/run").unwrap_or_default(),
        extra,
    }
}

/// Plain-text fingerprint for `hvbench host`.
pub fn describe(host: &HostInfo) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16} {v}\n"));
    line("class", host.class.clone());
    line("cpu", format!("{} ({})", host.cpu_model, host.cpu_vendor));
    line("cpus", host.cpus.to_string());
    line("memory", format!("{} MiB", host.memory_mib));
    line(
        "virtualization",
        format!(
            "vmx={} svm={} running-under-hypervisor={}",
            host.vmx, host.svm, host.hypervisor_flag
        ),
    );
    line("kernel", host.kernel.clone());
    line(
        "kvm",
        if host.kvm_module.is_empty() {
            "not loaded".into()
        } else {
            format!(
                "{} (paging {}, guest CPL0 {})",
                host.kvm_module, host.paging, host.cpl0
            )
        },
    );
    line(
        "tsc",
        host.tsc_khz
            .map(|k| format!("{k} kHz ({})", host.tsc_source))
            .unwrap_or_else(|| "unknown".into()),
    );
    line("thp", host.thp.clone());
    line("ksm run", host.ksm.clone());
    for (k, v) in &host.extra {
        line(k, v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracketed_choice() {
        assert_eq!(bracketed("always [madvise] never"), "madvise");
        assert_eq!(bracketed("[always] madvise never"), "always");
        assert_eq!(bracketed("0"), "0");
    }

    #[test]
    fn classes() {
        use HostClass::*;
        assert_eq!(classify("kvm_pvm", "AMD EPYC", true, false), Pvm);
        assert_eq!(
            classify("kvm_amd", "QEMU TCG CPU version 2.5+", true, true),
            NestedTcg
        );
        assert_eq!(classify("kvm_amd", "AMD EPYC 7B13", false, true), BareMetal);
        assert_eq!(classify("kvm_intel", "Intel Xeon", true, true), Nested);
        assert_eq!(classify("", "Intel Xeon", true, false), VmWithoutKvm);
    }

    #[test]
    fn fingerprint_is_consistent_with_this_machine() {
        let host = fingerprint();
        assert!(!host.cpu_model.is_empty());
        assert!(host.cpus >= 1);
        assert!(host.memory_mib > 0);
        let tsc = host.tsc_khz.expect("x86-64 hosts have a TSC");
        assert!((100_000..10_000_000).contains(&tsc), "{tsc} kHz");
        let class = host.class();
        assert!(!class.under_tcg || class.machine == Some(HostClass::NestedTcg));
        match class.machine {
            Some(HostClass::Pvm) => assert_eq!(
                (host.paging.as_str(), host.cpl0()),
                ("shadow", Some(Cpl0::Emulated))
            ),
            Some(HostClass::BareMetal) => assert!(!host.hypervisor_flag),
            Some(HostClass::Nested) => assert!(host.vmx || host.svm),
            Some(HostClass::VmWithoutKvm) => assert!(host.hypervisor_flag),
            Some(HostClass::NestedTcg) => assert!(host.cpu_model.contains("TCG")),
            other => panic!("unexpected class {other:?}"),
        }
        assert!(describe(&host).contains(&host.cpu_model));
    }
}
