//! Typed views of the host fingerprint. Records spell the host's class and how guest CPL0
//! code ran as words (the schema on disk); every decision on them goes through these types,
//! never through substrings.

use std::fmt;

use crate::record::HostInfo;

/// What kind of machine produced a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostClass {
    /// No hypervisor below the host.
    BareMetal,
    /// A VM with hardware virtualisation exposed to it.
    Nested,
    /// A VM whose KVM is kvm_pvm (shadow paging, guest CPL0 emulated).
    Pvm,
    /// A VM under QEMU's TCG translator: everything in it is emulated.
    NestedTcg,
    /// A VM without hardware virtualisation or KVM.
    VmWithoutKvm,
    /// A Xen dom0 (Xen does not tell dom0 whether it runs on bare metal).
    XenHost,
}

impl HostClass {
    const ALL: [HostClass; 6] = [
        HostClass::BareMetal,
        HostClass::Nested,
        HostClass::Pvm,
        HostClass::NestedTcg,
        HostClass::VmWithoutKvm,
        HostClass::XenHost,
    ];

    /// The word records use.
    pub const fn name(self) -> &'static str {
        match self {
            HostClass::BareMetal => "bare-metal",
            HostClass::Nested => "nested",
            HostClass::Pvm => "pvm",
            HostClass::NestedTcg => "nested-tcg",
            HostClass::VmWithoutKvm => "vm-without-kvm",
            HostClass::XenHost => "xen-host",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A record's host class: the machine's, and whether QEMU's TCG ran the guest on it
/// (`--backend qemu --qemu-accel tcg`, spelt `pvm+tcg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// `None` for a word this hvbench does not know (a newer record).
    pub machine: Option<HostClass>,
    pub under_tcg: bool,
}

const TCG_SUFFIX: &str = "+tcg";

impl Class {
    pub const fn of(machine: HostClass) -> Self {
        Class {
            machine: Some(machine),
            under_tcg: false,
        }
    }

    /// Reads the record's spelling.
    pub fn parse(text: &str) -> Self {
        let (machine, suffixed) = match text.strip_suffix(TCG_SUFFIX) {
            Some(machine) => (machine, true),
            None => (text, false),
        };
        let machine = HostClass::from_name(machine);
        Class {
            machine,
            under_tcg: suffixed || machine == Some(HostClass::NestedTcg),
        }
    }

    /// Every instruction the guest executed went through QEMU's translator.
    pub const fn with_tcg(self) -> Self {
        Class {
            under_tcg: true,
            ..self
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.machine.map_or("unknown", HostClass::name))?;
        if self.under_tcg && self.machine != Some(HostClass::NestedTcg) {
            f.write_str(TCG_SUFFIX)?;
        }
        Ok(())
    }
}

/// How guest CPL0 code ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpl0 {
    /// Under hardware virtualisation.
    Native,
    /// Instruction by instruction in software (kvm_pvm, TCG).
    Emulated,
}

impl Cpl0 {
    pub const fn name(self) -> &'static str {
        match self {
            Cpl0::Native => "native",
            Cpl0::Emulated => "emulated",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Cpl0::Native, Cpl0::Emulated]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

impl HostInfo {
    /// The host class, typed.
    pub fn class(&self) -> Class {
        Class::parse(&self.class)
    }

    /// How guest CPL0 code ran, typed; `None` when the record does not say.
    pub fn cpl0(&self) -> Option<Cpl0> {
        Cpl0::from_name(&self.cpl0)
    }

    /// Whether this host emulates guest CPL0 code (kvm_pvm) rather than virtualising it.
    pub fn emulates_cpl0(&self) -> bool {
        self.class().machine == Some(HostClass::Pvm) && self.cpl0() == Some(Cpl0::Emulated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip_through_their_spelling() {
        for machine in HostClass::ALL {
            for class in [Class::of(machine), Class::of(machine).with_tcg()] {
                let spelt = class.to_string();
                let read = Class::parse(&spelt);
                assert_eq!(read.machine, Some(machine), "{spelt}");
                assert_eq!(
                    read.under_tcg,
                    class.under_tcg || machine == HostClass::NestedTcg,
                    "{spelt}"
                );
            }
        }
        assert_eq!(Class::of(HostClass::Pvm).with_tcg().to_string(), "pvm+tcg");
        assert_eq!(Class::parse("quantum").machine, None);
        assert!(!Class::parse("pvm").under_tcg);
        // A word that merely contains another is not that class.
        assert_eq!(Class::parse("not-pvm").machine, None);
    }

    #[test]
    fn only_pvm_with_emulated_cpl0_emulates_cpl0() {
        let host = |class: &str, cpl0: &str| HostInfo {
            class: class.into(),
            cpl0: cpl0.into(),
            ..HostInfo::default()
        };
        assert!(host("pvm", "emulated").emulates_cpl0());
        assert!(!host("pvm", "native").emulates_cpl0());
        assert!(!host("nested-tcg", "emulated").emulates_cpl0());
        assert!(!host("not-pvm", "emulated").emulates_cpl0());
    }
}
