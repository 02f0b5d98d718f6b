//! Workload parameters: the schema each row of the workload table carries.
//!
//! A parameter has a key, a kind (how its value is written), a default, bounds and one
//! sentence of description. The harness checks every `--param` against its row before
//! anything starts; the guest reads the same row for keys and defaults. Nothing here
//! allocates: the guest parses values in place.

use core::fmt;

/// How a parameter's value is written and what its bounds count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// One size in bytes: `4096`, `64k`, `16m`, `1g`.
    Size,
    /// Sizes separated by commas (`16k,1m`); each is a series of its own.
    SizeList,
    /// Guest page sizes separated by commas, from `4k` and `2m`; each is a series.
    PageSizes,
    /// A decimal whole number (a count, milliseconds, seconds).
    Count,
    /// A decimal fraction from 0 to 1 (`0.25`); the bounds are in parts per million.
    Fraction,
}

impl ParamKind {
    /// Whether a value is a comma-separated list.
    pub const fn is_list(self) -> bool {
        matches!(self, ParamKind::SizeList | ParamKind::PageSizes)
    }

    const fn is_size(self) -> bool {
        matches!(
            self,
            ParamKind::Size | ParamKind::SizeList | ParamKind::PageSizes
        )
    }

    pub const fn name(self) -> &'static str {
        match self {
            ParamKind::Size => "a size (4096, 64k, 16m, 1g)",
            ParamKind::SizeList => "sizes separated by commas",
            ParamKind::PageSizes => "page sizes separated by commas",
            ParamKind::Count => "a whole number",
            ParamKind::Fraction => "a fraction from 0 to 1",
        }
    }
}

/// Who may set a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetBy {
    /// The user, with `--param WORKLOAD.KEY=VALUE`.
    User,
    /// The harness alone (per-guest values of host-driven workloads); `--param` refuses it.
    Host,
}

/// One parameter of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub key: &'static str,
    pub kind: ParamKind,
    /// The value when none is given; `None` where the default depends on the run (the
    /// description says how).
    pub default: Option<&'static str>,
    /// Smallest and largest value (each list entry), in bytes, units or parts per million.
    pub min: u64,
    pub max: u64,
    /// Every value must be a multiple of this (1: any).
    pub multiple_of: u64,
    /// Most entries of a list (1 for a single value).
    pub max_items: usize,
    /// Each value (each list entry) makes a series of its own: `key:value` in the
    /// sample's series parameters.
    pub series: bool,
    pub set_by: SetBy,
    /// One sentence on what it sets.
    pub description: &'static str,
}

/// Why a parameter's value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError {
    /// Not written as the kind says.
    Malformed,
    /// Outside `min..=max`.
    OutOfBounds,
    /// Not a multiple of `multiple_of`.
    NotMultiple,
    /// A page size other than 4k and 2m.
    NotPageSize,
    /// More list entries than `max_items`, or an empty one.
    TooMany,
    /// The same list entry twice.
    Duplicate,
}

impl ParamError {
    pub const fn message(self) -> &'static str {
        match self {
            ParamError::Malformed => "malformed value",
            ParamError::OutOfBounds => "value out of bounds",
            ParamError::NotMultiple => "value is not a whole multiple",
            ParamError::NotPageSize => "page size other than 4k and 2m",
            ParamError::TooMany => "too many or empty list entries",
            ParamError::Duplicate => "the same entry twice",
        }
    }
}

/// Guest page sizes a `PageSizes` entry may name.
pub const PAGE_4K: u64 = 4 << 10;
pub const PAGE_2M: u64 = 2 << 20;

impl ParamSpec {
    /// Parses one value (one list entry) and checks it against the bounds.
    pub fn parse_one(&self, text: &str) -> Result<u64, ParamError> {
        let value = match self.kind {
            ParamKind::Size | ParamKind::SizeList | ParamKind::PageSizes => parse_size(text),
            ParamKind::Count => parse_decimal(text),
            ParamKind::Fraction => crate::ksm::parse_fraction_ppm(text).map(u64::from),
        }
        .ok_or(ParamError::Malformed)?;
        if self.kind == ParamKind::PageSizes && value != PAGE_4K && value != PAGE_2M {
            return Err(ParamError::NotPageSize);
        }
        if value < self.min || value > self.max {
            return Err(ParamError::OutOfBounds);
        }
        if self.multiple_of > 1 && value % self.multiple_of != 0 {
            return Err(ParamError::NotMultiple);
        }
        Ok(value)
    }

    /// The entries of a value as written (one for a single value).
    pub fn entries<'a>(&self, text: &'a str) -> impl Iterator<Item = &'a str> {
        let list = self.kind.is_list();
        let mut rest = Some(text);
        core::iter::from_fn(move || {
            let t = rest?;
            match t.split_once(',').filter(|_| list) {
                Some((head, tail)) => {
                    rest = Some(tail);
                    Some(head)
                }
                None => {
                    rest = None;
                    Some(t)
                }
            }
        })
    }

    /// Checks a whole value: every entry parses within bounds, at most `max_items` of
    /// them, none twice. Returns the number of entries.
    pub fn check(&self, text: &str) -> Result<usize, ParamError> {
        let mut count = 0;
        for (i, entry) in self.entries(text).enumerate() {
            if i >= self.max_items || entry.is_empty() {
                return Err(ParamError::TooMany);
            }
            let value = self.parse_one(entry)?;
            for earlier in self.entries(text).take(i) {
                if self.parse_one(earlier) == Ok(value) {
                    return Err(ParamError::Duplicate);
                }
            }
            count += 1;
        }
        Ok(count)
    }

    /// The bounds in words, for error messages and `hvbench list`.
    pub fn bounds(&self) -> Bounds<'_> {
        Bounds(self)
    }
}

/// Parses a plain decimal number (no sign, no suffix).
pub fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Writes `value` in the kind's unit: sizes with the largest exact suffix.
struct Amount(ParamKind, u64);

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Amount(kind, v) = *self;
        if kind == ParamKind::Fraction {
            let (whole, ppm) = (v / 1_000_000, v % 1_000_000);
            if ppm == 0 {
                return write!(f, "{whole}");
            }
            let mut digits = 6;
            let mut frac = ppm;
            while frac % 10 == 0 {
                frac /= 10;
                digits -= 1;
            }
            return write!(f, "{whole}.{frac:0digits$}");
        }
        if kind.is_size() && v > 0 {
            for (shift, suffix) in [(30, "g"), (20, "m"), (10, "k")] {
                if v % (1 << shift) == 0 {
                    return write!(f, "{}{suffix}", v >> shift);
                }
            }
        }
        write!(f, "{v}")
    }
}

/// A parameter's bounds in words: `4k..=4g, a multiple of 4k, at most 16 entries`.
#[derive(Debug)]
pub struct Bounds<'a>(&'a ParamSpec);

impl fmt::Display for Bounds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        if p.kind == ParamKind::PageSizes {
            write!(f, "4k and/or 2m")?;
        } else {
            write!(f, "{}..={}", Amount(p.kind, p.min), Amount(p.kind, p.max))?;
        }
        if p.multiple_of > 1 {
            write!(f, ", a multiple of {}", Amount(p.kind, p.multiple_of))?;
        }
        if p.kind.is_list() {
            write!(f, ", at most {} entries", p.max_items)?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::string::ToString;

    const WS: ParamSpec = ParamSpec {
        key: "ws",
        kind: ParamKind::SizeList,
        default: Some("16k,1m"),
        min: 4096,
        max: 1 << 30,
        multiple_of: 4096,
        max_items: 3,
        series: true,
        set_by: SetBy::User,
        description: "test",
    };

    #[test]
    fn lists_are_checked_entry_by_entry() {
        assert_eq!(WS.check("16k,1m"), Ok(2));
        assert_eq!(WS.check("16k,16384"), Err(ParamError::Duplicate));
        assert_eq!(WS.check("16k,,1m"), Err(ParamError::TooMany));
        assert_eq!(WS.check("4k,8k,12k,16k"), Err(ParamError::TooMany));
        assert_eq!(WS.check("0"), Err(ParamError::OutOfBounds));
        assert_eq!(WS.check("2g"), Err(ParamError::OutOfBounds));
        assert_eq!(
            WS.check("18446744073709551615"),
            Err(ParamError::OutOfBounds)
        );
        assert_eq!(WS.check("99999999999999999999"), Err(ParamError::Malformed));
        assert_eq!(WS.check("5000"), Err(ParamError::NotMultiple));
        assert_eq!(WS.check("x"), Err(ParamError::Malformed));
        assert_eq!(
            WS.bounds().to_string(),
            "4k..=1g, a multiple of 4k, at most 3 entries"
        );
        let pages = ParamSpec {
            kind: ParamKind::PageSizes,
            min: PAGE_4K,
            max: PAGE_2M,
            ..WS
        };
        assert_eq!(pages.check("4k,2m"), Ok(2));
        assert_eq!(pages.check("1m"), Err(ParamError::NotPageSize));
        let single = ParamSpec {
            kind: ParamKind::Size,
            max_items: 1,
            ..WS
        };
        assert_eq!(single.check("16k,1m"), Err(ParamError::Malformed));
        let count = ParamSpec {
            kind: ParamKind::Count,
            min: 2,
            max: 16,
            multiple_of: 1,
            max_items: 1,
            ..WS
        };
        assert_eq!(count.check("4"), Ok(1));
        assert_eq!(count.check("1k"), Err(ParamError::Malformed));
        assert_eq!(count.check("+4"), Err(ParamError::Malformed));
        assert_eq!(count.bounds().to_string(), "2..=16");
        let fraction = ParamSpec {
            kind: ParamKind::Fraction,
            min: 0,
            max: 1_000_000,
            ..count
        };
        assert_eq!(fraction.bounds().to_string(), "0..=1");
        assert_eq!(fraction.check("0.125"), Ok(1));
        assert_eq!(
            ParamSpec {
                min: 50_000,
                ..fraction
            }
            .bounds()
            .to_string(),
            "0.05..=1"
        );
    }
}

/// Parses a size such as `4096`, `64k`, `16m`, `1g` (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}
