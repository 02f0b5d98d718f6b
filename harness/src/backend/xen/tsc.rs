//! Which TSC mode a domain runs with (xl's `tsc_mode`), and why.
//!
//! On a real host Xen's default mode lets a guest read the TSC natively: the CPU's TSC is
//! invariant (CPUID 0x80000007 EDX bit 8), which Xen takes as reliable. QEMU's TCG cannot
//! offer an invariant TSC (it drops `+invtsc` with a warning), so in the lab Xen's
//! default traps and emulates every RDTSC, a path no real host would take: `cpu.idle`
//! counted about 5,000-10,700 instructions an operation instead of the guest's 18. In the
//! lab a domain therefore asks for what a real host would give it, `native`; against a
//! real host Xen decides as it does for any user.

/// xl's `tsc_mode` for hvbench's domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscMode {
    /// Xen's choice (native where the host's TSC is invariant).
    Default,
    /// RDTSC never trapped, as Xen's default gives on a host with an invariant TSC.
    Native,
}

impl TscMode {
    /// The mode for a domain on a lab (nested under TCG) or on a real Xen host.
    pub fn for_host(lab: bool) -> Self {
        if lab {
            TscMode::Native
        } else {
            TscMode::Default
        }
    }

    /// The config line, none for Xen's default.
    pub fn config_line(self) -> &'static str {
        match self {
            TscMode::Default => "",
            TscMode::Native => "tsc_mode = \"native\"\n",
        }
    }

    /// What records say (backend details, `tsc_mode`).
    pub fn detail(self) -> &'static str {
        match self {
            TscMode::Default => "default (Xen's choice: native where the host's TSC is invariant)",
            TscMode::Native => {
                "native (lab: TCG offers no invariant TSC, so Xen's default would trap RDTSC, \
                 which a real host's would not)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_asks_for_native_and_a_real_host_keeps_xens_default() {
        assert_eq!(TscMode::for_host(true), TscMode::Native);
        assert_eq!(TscMode::for_host(false), TscMode::Default);
        assert_eq!(TscMode::Native.config_line(), "tsc_mode = \"native\"\n");
        assert_eq!(TscMode::Default.config_line(), "");
        assert!(TscMode::Native.detail().starts_with("native"));
    }
}
