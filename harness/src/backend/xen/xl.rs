//! The `xl` toolstack's vocabulary: `xl info`, domain configs, shutdown reasons, and the
//! dom0's fingerprint.

use std::collections::BTreeMap;

use reports::host::{Class, Cpl0, HostClass};
use reports::record::HostInfo;

use crate::backend::balloon::HostMemory;
use lab::LabKind;

/// Guest paging on Xen: hardware-assisted (EPT/NPT) or shadow page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Paging {
    Hap,
    Shadow,
}

impl Paging {
    pub fn name(self) -> &'static str {
        match self {
            Paging::Hap => "hap",
            Paging::Shadow => "shadow",
        }
    }

    /// The `virt_caps` word of `xl info` that says the hypervisor can do it.
    pub fn virt_cap(self) -> &'static str {
        self.name()
    }
}

/// `SCHEDOP_shutdown` reasons as `xl list -v` prints them (xen/include/public/sched.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    Poweroff,
    Reboot,
    Suspend,
    Crash,
    Watchdog,
    SoftReset,
    Unknown,
}

impl ShutdownReason {
    pub fn from_code(code: &str) -> Self {
        match code.trim() {
            "0" => Self::Poweroff,
            "1" => Self::Reboot,
            "2" => Self::Suspend,
            "3" => Self::Crash,
            "4" => Self::Watchdog,
            "5" => Self::SoftReset,
            _ => Self::Unknown,
        }
    }
}

/// `xl info` as key/value pairs.
#[derive(Clone, Debug, Default)]
pub struct XlInfo(BTreeMap<String, String>);

impl XlInfo {
    pub fn parse(text: &str) -> Self {
        XlInfo(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty() && !k.contains(' '))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `4.17.7` from xen_major, xen_minor and xen_extra.
    pub fn version(&self) -> String {
        match (self.get("xen_major"), self.get("xen_minor")) {
            (Some(major), Some(minor)) => {
                format!("{major}.{minor}{}", self.get("xen_extra").unwrap_or(""))
            }
            _ => self.get("xen_version").unwrap_or("unknown").to_string(),
        }
    }

    pub fn virt_caps(&self) -> Vec<String> {
        self.get("virt_caps")
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// An xl domain configuration for the hvbench guest.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    pub name: String,
    pub kernel: String,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub paging: Paging,
    /// Physical CPUs the domain's vCPUs may run on (`cpus`), when pinned.
    pub cpus: Option<u32>,
    /// The block workloads' disk on the dom0 and the hotplug script that makes it a loop
    /// device for blkback, where the run has one.
    pub disk: Option<(String, String)>,
    /// xl's `tsc_mode` (nothing written for Xen's default).
    pub tsc_mode: super::tsc::TscMode,
    /// The cpupool the domain is created in (`pool`), where not Pool-0 (`sched.*`).
    pub pool: Option<String>,
}

/// A value for an xl config string (double quotes; hvbench's values never need escapes,
/// and anything that would is refused rather than mangled).
fn xl_string(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != '"' && *c != '\\')
        .collect();
    format!("\"{clean}\"")
}

impl DomainConfig {
    pub fn render(&self) -> String {
        // Every domain stays after it stops, so its shutdown reason can be read; the
        // session destroys it. (A triple fault in a PVH guest is reported as reboot.)
        format!(
            "name = {}\ntype = \"pvh\"\nkernel = {}\ncmdline = {}\nmemory = {}\nmaxmem = {}\nvcpus = {}\nhap = {}\n\
             on_poweroff = \"preserve\"\non_reboot = \"preserve\"\non_crash = \"preserve\"\n",
            xl_string(&self.name),
            xl_string(&self.kernel),
            xl_string(&self.cmdline),
            self.memory_mib,
            self.memory_mib,
            self.vcpus,
            match self.paging {
                Paging::Hap => 1,
                Paging::Shadow => 0,
            },
        ) + self.tsc_mode.config_line()
            + &self
                .cpus
                .map(|cpu| format!("cpus = \"{cpu}\"\n"))
                .unwrap_or_default()
            + &self
                .pool
                .as_ref()
                .map(|pool| format!("pool = {}\n", xl_string(pool)))
                .unwrap_or_default()
            + &self.render_disk()
    }

    /// `disk = [...]`: xvda through blkback (`backendtype=phy`; with a `script=` libxl
    /// accepts a file there), `target=` last as xl's disk syntax wants it.
    fn render_disk(&self) -> String {
        let Some((path, script)) = &self.disk else {
            return String::new();
        };
        let plain = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
        };
        if !plain(path) || !plain(script) {
            // The paths come from `mktemp -d` (checked plain); anything else is refused.
            return String::new();
        }
        format!(
            "disk = [ 'format=raw,vdev=xvda,access=rw,backendtype=phy,script={script},target={path}' ]\n"
        )
    }
}

/// Reads what `xl list <domain> | tail -n 1; xl info | grep '^free_memory'` printed: the
/// domain's memory (MiB, the list's third column) and Xen's free memory (MiB).
pub fn parse_balloon_memory(text: &str, domain: &str) -> Result<HostMemory, String> {
    let mib = 1u64 << 20;
    let mut guest = None;
    let mut free = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [name, _id, mem, ..] if *name == domain => guest = mem.parse::<u64>().ok(),
            ["free_memory", ":", value] => free = value.parse::<u64>().ok(),
            _ => {}
        }
    }
    let guest = guest.ok_or_else(|| format!("`xl list` printed no memory for it: {text:?}"))?;
    Ok(HostMemory {
        guest_bytes: guest * mib,
        host_free_bytes: free.map(|f| f * mib),
    })
}

/// The fingerprint of a Xen host: Xen's own view (`xl info`) and dom0's
/// (`uname -r`, /proc/cpuinfo).
pub fn fingerprint(info: &XlInfo, dom0: &str, paging: Paging, lab: Option<&LabKind>) -> HostInfo {
    let mut lines = dom0.lines();
    let kernel = lines.next().unwrap_or("").trim().to_string();
    let field = |prefix: &str| {
        dom0.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut extra = BTreeMap::new();
    for key in [
        "xen_version",
        "xen_scheduler",
        "virt_caps",
        "cpu_mhz",
        "hw_caps",
        "xen_commandline",
    ] {
        if let Some(v) = info.get(key) {
            extra.insert(
                format!("xen_{}", key.trim_start_matches("xen_")),
                v.to_string(),
            );
        }
    }
    let cpu_model = field("model name");
    // QEMU names its TCG CPU model after the translator; a host reached over SSH can be
    // a TCG-nested one too.
    let tcg = lab.is_some_and(|l| l.accel == "tcg") || cpu_model.contains("TCG");
    let (class, cpl0) = match lab {
        // Every instruction of Xen and its guests goes through QEMU's translator.
        _ if tcg => (HostClass::NestedTcg, Cpl0::Emulated),
        Some(_) => (HostClass::Nested, Cpl0::Native),
        // Xen does not tell dom0 whether it runs on bare metal.
        None => (HostClass::XenHost, Cpl0::Native),
    };
    HostInfo {
        class: Class::of(class).to_string(),
        hostname: info.get("host").unwrap_or("").to_string(),
        cpu_vendor: field("vendor_id"),
        cpu_model,
        cpus: info
            .get("nr_cpus")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        memory_mib: info
            .get("total_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        vmx: false,
        svm: false,
        hypervisor_flag: lab.is_some(),
        kernel: format!("dom0 {kernel}"),
        kvm_module: String::new(),
        paging: format!("xen-{}", paging.name()),
        cpl0: cpl0.name().to_string(),
        tsc_khz: None,
        tsc_source: "the guest's (Xen CPUID leaf 4)".into(),
        thp: "n/a".into(),
        ksm: "n/a".into(),
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XL_INFO: &str =
        "host                   : (none)\nrelease                : 6.1.0-56-amd64\n\
        nr_cpus                : 2\ntotal_memory           : 3071\nxen_major              : 4\n\
        xen_minor              : 17\nxen_extra              : .7\nxen_version            : 4.17.7\n\
        xen_caps               : xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64\n\
        virt_caps              : pv hvm hap gnttab-v1 gnttab-v2\nxen_scheduler          : credit2\n\
        xen_commandline        : console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M\n";

    #[test]
    fn parses_xl_info() {
        let info = XlInfo::parse(XL_INFO);
        assert_eq!(info.version(), "4.17.7");
        assert_eq!(info.get("xen_scheduler"), Some("credit2"));
        assert!(info.virt_caps().contains(&"hap".to_string()));
        assert!(!info.virt_caps().contains(&"shadow".to_string()));
        // Values may contain colons.
        assert_eq!(
            info.get("xen_commandline"),
            Some("console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M")
        );
        let host = fingerprint(
            &info,
            "6.1.0-56-amd64\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n",
            Paging::Hap,
            Some(&LabKind {
                accel: "tcg".into(),
                hypervisor: None,
                insns_log: None,
            }),
        );
        assert_eq!(host.class, "nested-tcg");
        assert_eq!(host.cpu_model, "AMD EPYC");
        assert_eq!(host.cpus, 2);
        assert_eq!(host.paging, "xen-hap");
        assert_eq!(host.kernel, "dom0 6.1.0-56-amd64");
        let remote = fingerprint(
            &info,
            "6.1\nmodel name\t: QEMU TCG CPU version 2.5+\n",
            Paging::Hap,
            None,
        );
        assert_eq!(remote.class, "nested-tcg");
        let real = fingerprint(&info, "6.1\nmodel name\t: Intel Xeon\n", Paging::Hap, None);
        assert_eq!(real.class, "xen-host");
    }

    #[test]
    fn parses_balloon_memory() {
        let text =
            "hvbench-7-1                                  3   192     1     -b----       4.1\n\
                    free_memory            : 2078\n";
        let m = parse_balloon_memory(text, "hvbench-7-1").unwrap();
        assert_eq!(m.guest_bytes, 192 << 20);
        assert_eq!(m.host_free_bytes, Some(2078 << 20));
        // Another domain's line, or none at all, is an error, not a zero.
        parse_balloon_memory(text, "hvbench-7-2").unwrap_err();
        parse_balloon_memory("", "hvbench-7-1").unwrap_err();
        let without_free = parse_balloon_memory("hvbench-7-1 3 256 1 r----- 1.0\n", "hvbench-7-1");
        assert_eq!(without_free.unwrap().host_free_bytes, None);
    }

    #[test]
    fn config_is_pvh_and_preserves_stopped_domains() {
        let c = DomainConfig {
            name: "hvbench-1-2".into(),
            kernel: "/tmp/hvbench/g.elf".into(),
            cmdline: "hvbench run=cpu.idle samples=3 \"x\"".into(),
            memory_mib: 64,
            vcpus: 1,
            paging: Paging::Shadow,
            cpus: None,
            disk: None,
            tsc_mode: crate::backend::xen::tsc::TscMode::Default,
            pool: None,
        };
        let text = c.render();
        assert!(!text.contains("tsc_mode"), "{text}");
        let native = DomainConfig {
            tsc_mode: crate::backend::xen::tsc::TscMode::Native,
            ..c.clone()
        };
        assert!(native.render().contains("\ntsc_mode = \"native\"\n"));
        assert!(!text.contains("\ncpus ="), "{text}");
        let pinned = DomainConfig {
            cpus: Some(1),
            ..c.clone()
        };
        assert!(pinned.render().ends_with("cpus = \"1\"\n"));
        assert!(!text.contains("disk"), "{text}");
        assert!(text.contains("type = \"pvh\""));
        assert!(text.contains("hap = 0"));
        assert!(text.contains("on_reboot = \"preserve\""));
        assert!(
            text.contains("cmdline = \"hvbench run=cpu.idle samples=3 x\""),
            "{text}"
        );
        let with_disk = DomainConfig {
            disk: Some((
                "/tmp/hvbench.x/disk.img".into(),
                "/tmp/hvbench.x/block".into(),
            )),
            ..c
        };
        assert!(with_disk.render().ends_with(
            "disk = [ 'format=raw,vdev=xvda,access=rw,backendtype=phy,\
             script=/tmp/hvbench.x/block,target=/tmp/hvbench.x/disk.img' ]\n"
        ));
        let odd = DomainConfig {
            disk: Some(("/tmp/a b',x".into(), "/tmp/block".into())),
            pool: None,
            ..with_disk
        };
        assert!(!odd.render().contains("disk"));
        assert_eq!(ShutdownReason::from_code("1"), ShutdownReason::Reboot);
        assert_eq!(ShutdownReason::from_code("x"), ShutdownReason::Unknown);
    }
}
