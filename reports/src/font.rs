//! Chart text comes from an embedded font, DejaVu Sans (shipped as bytes by the `dejavu`
//! crate; Bitstream Vera licence, which allows embedding and redistribution). PNG charts
//! therefore look the same on every machine, and rendering never reads system fonts or
//! fontconfig. SVG charts name the same family and leave text to the viewer.

use std::sync::OnceLock;

use plotters::style::{register_font, FontStyle};

/// The family charts ask for; plotters' ab_glyph backend finds the embedded font by it.
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters once per process; `false` if the font bytes
/// could not be parsed (not expected: they are compiled in).
pub fn ensure_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FAMILY, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_font_registers() {
        assert!(super::ensure_registered());
        assert!(super::ensure_registered(), "idempotent");
    }
}
