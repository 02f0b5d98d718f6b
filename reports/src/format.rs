//! Small text helpers shared by the report, the charts and the comparison table.

use std::fmt::Write as _;

/// A number with about four significant digits: 23.46, 1235, 0.01234.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "∞".into()
        } else {
            "-∞".into()
        };
    }
    if v == 0.0 {
        return "0".into();
    }
    // v is finite and non-zero: floor(log10 |v|) is within -324..=308.
    #[allow(clippy::cast_possible_truncation)]
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = usize::try_from(3 - magnitude).map_or(0, |d| d.min(6));
    format!("{v:.decimals$}")
}

/// An axis tick: like [`number`], without trailing zeros (10, 2.5, 1000).
pub fn tick(v: f64) -> String {
    let text = number(v);
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// A relative change as a signed percentage: +12.3%, -0.4%.
pub fn percent(change: f64) -> String {
    if !change.is_finite() {
        return number(change);
    }
    format!("{:+.1}%", change * 100.0)
}

/// A p-value: 3 significant digits, or "< 0.001" at the resolution a 9,999-resample
/// test has.
pub fn p_value(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// A file-name-safe form of untrusted text: ASCII letters, digits, `-`, `_` and `.`
/// (never leading), at most `max` characters; never empty.
pub fn slug(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    while out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// FNV-1a, 64 bits: a stable short hash for file names (not for security).
/// The low 32 bits of [`stable_hash`]: short enough for a file name or an anchor.
// Keeping the low half is the point: the truncation is intended.
#[allow(clippy::cast_possible_truncation)]
pub fn short_hash(text: &str) -> u32 {
    stable_hash(text) as u32
}

pub fn stable_hash(text: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Untrusted text made safe for a terminal: control characters (escape sequences
/// included) are shown escaped instead of being interpreted.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Untrusted text for a chart label: no control characters, at most `max` characters.
pub fn label(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Left-aligned columns two spaces apart, each as wide as its widest cell.
pub fn columns(table: &[Vec<String>]) -> String {
    let columns = table.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell}{}", " ".repeat(width - cell.chars().count())))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(23.456), "23.46");
        assert_eq!(number(1234.5), "1234");
        assert_eq!(number(0.012341), "0.01234");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(-5.0), "-5.000");
        assert_eq!(number(f64::INFINITY), "∞");
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(1000.0), "1000");
        assert_eq!(tick(0.0), "0");
        assert_eq!(percent(0.1234), "+12.3%");
        assert_eq!(percent(-0.004), "-0.4%");
        assert_eq!(p_value(0.0001), "< 0.001");
        assert_eq!(p_value(0.5), "0.500");
    }

    #[test]
    fn untrusted_text() {
        assert_eq!(slug("../../etc/passwd", 40), "_._.._etc_passwd");
        assert_eq!(slug("<script>", 40), "_script_");
        assert_eq!(slug("", 4), "_");
        assert_eq!(slug("abcdef", 3), "abc");
        assert_eq!(terminal_safe("a\x1b[31mred\n"), "a\\u{1b}[31mred\\n");
        assert_eq!(label("a\nb", 10), "a?b");
        assert_eq!(label("abcdefgh", 4), "abc…");
        assert_ne!(stable_hash("a"), stable_hash("b"));
    }
}
