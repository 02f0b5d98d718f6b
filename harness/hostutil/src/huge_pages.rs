//! Transparent huge pages: the advice a buffer (guest RAM, or a native twin's buffer) is
//! mapped with, and what this host makes of it. Guest and twin must agree, so that a
//! guest/native ratio compares like with like.

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The huge-page advice a buffer (guest RAM, or a twin's buffer) is mapped with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePageAdvice {
    /// `madvise(MADV_HUGEPAGE)`: transparent huge pages where the host's THP mode is
    /// `always` or `madvise` (hvbench's VMM with `--host-hugepages`; QEMU always).
    HugePages,
    /// No advice: transparent huge pages only where the host's THP mode is `always`
    /// (hvbench's VMM by default).
    NoAdvice,
}

impl HugePageAdvice {
    pub fn name(self) -> &'static str {
        match self {
            HugePageAdvice::HugePages => "MADV_HUGEPAGE",
            HugePageAdvice::NoAdvice => "no huge-page advice",
        }
    }

    /// Whether the host backs such memory with transparent huge pages, given its THP
    /// mode (`always`, `madvise`, `never`).
    pub fn gets_huge_pages(self, thp_mode: &str) -> bool {
        matches!(
            (self, thp_mode),
            (_, "always") | (HugePageAdvice::HugePages, "madvise")
        )
    }

    /// For a record: the advice and what this host makes of it.
    pub fn describe(self, thp_mode: Option<&str>) -> String {
        match thp_mode {
            Some(mode) => format!(
                "{} (THP mode {mode}: {} pages)",
                self.name(),
                if self.gets_huge_pages(mode) {
                    "2 MiB"
                } else {
                    "4 KiB"
                }
            ),
            None => format!("{} (THP mode unknown)", self.name()),
        }
    }
}

/// This host's transparent-huge-page mode (the bracketed choice in sysfs).
pub fn thp_mode() -> Option<String> {
    let text = std::fs::read_to_string(THP_ENABLED).ok()?;
    let start = text.find('[')?;
    let end = start + text[start..].find(']')?;
    Some(text[start + 1..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_advice_follows_the_thp_mode() {
        use HugePageAdvice::*;
        assert!(HugePages.gets_huge_pages("madvise") && HugePages.gets_huge_pages("always"));
        assert!(!NoAdvice.gets_huge_pages("madvise") && NoAdvice.gets_huge_pages("always"));
        assert!(!HugePages.gets_huge_pages("never"));
        assert_eq!(
            HugePages.describe(Some("madvise")),
            "MADV_HUGEPAGE (THP mode madvise: 2 MiB pages)"
        );
    }
}
