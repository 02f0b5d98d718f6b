//! `mem.ksm`: what the guest fills its memory with, and what the host rings to go on.
//!
//! Each guest fills a region of its RAM page by page. A fraction of the pages, spread
//! evenly over the region, is *identical*: page `i` holds the same bytes in every guest (and
//! different bytes from every other page, so KSM merges one copy per guest and no more).
//! The rest is *unique*: derived from the guest's seed, so no two pages anywhere match.
//! The host computes from the same rules how many pages KSM should be able to merge.

/// Bytes per page KSM merges (x86-64 base page).
pub const PAGE_BYTES: u64 = 4096;
const WORDS_PER_PAGE: u64 = PAGE_BYTES / 8;
/// [`WORDS_PER_PAGE`] as an index bound.
const WORDS_PER_PAGE_USIZE: usize = 4096 / 8;
const _: () = assert!(WORDS_PER_PAGE_USIZE as u64 == WORDS_PER_PAGE);

/// Parts per million: the unit of the identical fraction, so the guest needs no floats.
pub const PPM: u64 = 1_000_000;

/// Doorbell values (see [`crate::abi::DOORBELL_PORT`]): time first writes, then end.
pub const RING_MEASURE: u32 = 1;
/// Doorbell value: end without measuring.
pub const RING_END: u32 = 2;

/// Parses a fraction between 0 and 1 written as a decimal (`0.5`, `1`, `.25`, `0.125`) into
/// parts per million, without floats. Digits beyond the sixth decimal must be zero.
pub fn parse_fraction_ppm(text: &str) -> Option<u32> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || whole.len() > 1 {
        return None;
    }
    let mut ppm: u64 = match whole {
        "" | "0" => 0,
        "1" => PPM,
        _ => return None,
    };
    let mut scale = PPM / 10;
    for (i, b) in fraction.bytes().enumerate() {
        let d = u64::from(b - b'0');
        if i >= 6 {
            if d != 0 {
                return None;
            }
            continue;
        }
        ppm += d * scale;
        scale /= 10;
    }
    u32::try_from(ppm).ok().filter(|_| ppm <= PPM)
}

/// Whether page `page` of the region is an identical one: exactly
/// `floor(pages * ppm / 1e6)` of the first `pages` pages are, spread evenly.
pub fn is_identical(page: u64, ppm: u32) -> bool {
    let ppm = u64::from(ppm);
    (page + 1) * ppm / PPM > page * ppm / PPM
}

/// How many of `pages` pages are identical ones.
pub fn identical_pages(pages: u64, ppm: u32) -> u64 {
    pages * u64::from(ppm) / PPM
}

/// SplitMix64's finaliser: a cheap bijective mix, good enough to make pages distinct.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Domain tags keep identical and unique pages apart, whatever the seed.
const IDENTICAL_TAG: u64 = 0x1de7_1ca1_0000_0000;
const UNIQUE_TAG: u64 = 0x0e1f_0e00_0000_0000;

/// The key that determines page `page`'s contents in the guest with `seed`.
pub fn page_key(seed: u64, page: u64, ppm: u32) -> u64 {
    if is_identical(page, ppm) {
        mix(IDENTICAL_TAG ^ page)
    } else {
        mix(mix(UNIQUE_TAG ^ seed) ^ page)
    }
}

/// Word `word` of the page with `key`.
pub fn page_word(key: u64, word: u64) -> u64 {
    // Never zero in practice, and never the same word pattern twice within a page.
    mix(key.wrapping_add(word.wrapping_mul(0x9e37_79b9_7f4a_7c15))) | 1
}

/// Fills one page with the words of `key`.
///
/// # Safety
/// `page` must point to [`PAGE_BYTES`] writable bytes, 8-byte aligned.
pub unsafe fn fill_page(page: *mut u64, key: u64) {
    for (i, w) in (0..WORDS_PER_PAGE_USIZE).zip(0..WORDS_PER_PAGE) {
        // SAFETY: i < WORDS_PER_PAGE_USIZE, inside the caller's page.
        unsafe { page.add(i).write_volatile(page_word(key, w)) };
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction_ppm("0.5"), Some(500_000));
        assert_eq!(parse_fraction_ppm(".25"), Some(250_000));
        assert_eq!(parse_fraction_ppm("1"), Some(1_000_000));
        assert_eq!(parse_fraction_ppm("1.0"), Some(1_000_000));
        assert_eq!(parse_fraction_ppm("0"), Some(0));
        assert_eq!(parse_fraction_ppm("0.000001"), Some(1));
        assert_eq!(parse_fraction_ppm("0.1250000"), Some(125_000));
        for bad in [
            "",
            ".",
            "1.5",
            "2",
            "0.0000001",
            "-0.5",
            "0.5x",
            "00.5",
            "1e-3",
            "0,5",
        ] {
            assert_eq!(parse_fraction_ppm(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn identical_pages_are_counted_and_spread() {
        for (pages, ppm) in [(1000, 500_000), (1001, 333_333), (64, 0), (64, 1_000_000)] {
            let marked = (0..pages).filter(|p| is_identical(*p, ppm)).count() as u64;
            assert_eq!(marked, identical_pages(pages, ppm), "{pages} {ppm}");
        }
        // Half: every other page.
        let half: Vec<bool> = (0..6).map(|p| is_identical(p, 500_000)).collect();
        assert_eq!(half, [false, true, false, true, false, true]);
    }

    #[test]
    fn identical_pages_match_across_guests_and_nothing_else_does() {
        let ppm = 500_000;
        let page = |seed: u64, p: u64| -> Vec<u64> {
            let mut buf = std::vec![0u64; WORDS_PER_PAGE_USIZE];
            // SAFETY: the buffer holds one page.
            unsafe { fill_page(buf.as_mut_ptr(), page_key(seed, p, ppm)) };
            buf
        };
        assert_eq!(
            page(1, 1),
            page(2, 1),
            "identical page differs across guests"
        );
        assert_ne!(page(1, 0), page(2, 0), "unique page matches across guests");
        let mut all: Vec<Vec<u64>> = (0..64).map(|p| page(1, p)).collect();
        all.extend(
            (0..64)
                .filter(|p| !is_identical(*p, ppm))
                .map(|p| page(2, p)),
        );
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "two pages of the same contents");
        assert!(page(3, 5).iter().all(|w| *w != 0));
    }
}
