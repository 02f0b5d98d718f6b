//! The paging mode KVM gives its guests, as `hvbench host paging` and `lab run kvm --paging`
//! name it.

use serde::{Deserialize, Serialize};

/// The paging mode asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PagingMode {
    /// Two-dimensional paging: EPT (kvm_intel ept=1) or NPT (kvm_amd npt=1).
    Tdp,
    /// Shadow page tables kept by KVM (ept=0 / npt=0).
    Shadow,
}

impl PagingMode {
    pub fn name(self) -> &'static str {
        match self {
            PagingMode::Tdp => "tdp",
            PagingMode::Shadow => "shadow",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tdp" => Some(PagingMode::Tdp),
            "shadow" => Some(PagingMode::Shadow),
            _ => None,
        }
    }

    /// The value of the module's `ept`/`npt` parameter that gives this mode.
    pub fn tdp_enabled(self) -> bool {
        self == PagingMode::Tdp
    }
}
