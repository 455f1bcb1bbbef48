//! bitsandbytes' CPU 8-bit blockwise quantizer (`quantize_blockwise` on CPU, 0.50): a 65 536-bin
//! lookup table over [-1, 1] instead of a search, which is what double quantization runs there.
//!
//! Table: bin `i` holds the value `-1 + 2i/65535` and the code of the first entry whose midpoint
//! with its successor is not below it (nearest entry, ties to the lower one, at the bin's value).
//! Lookup of `x` in [-1, 1]: bin `⌊(x + 1)·0.5·65535 + 0.5⌋`. Near a midpoint between two
//! entries this can round to the farther entry (the bin's value, not `x`, is compared), which is
//! the "inexact" rounding `tests/golden/README.md` documents; reproducing it makes bellows' 8-bit
//! codes identical to bitsandbytes'.

use std::sync::OnceLock;

use super::codebook::dynamic_map;

/// Bins of the table.
const BINS: usize = 65_536;

/// The table for a sorted code book of any length up to 256 entries.
pub(crate) fn build_lut(code: &[f32]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(BINS);
    let mut idx = 0usize;
    for i in 0..BINS {
        #[allow(clippy::cast_precision_loss)]
        let val = -1.0f32 + (2.0f32 * i as f32) / (BINS - 1) as f32;
        while idx < mids.len() && mids[idx] < val {
            idx += 1;
        }
        lut.push(u8::try_from(idx).expect("code books have at most 256 entries"));
    }
    lut
}

/// The table of bitsandbytes' dynamic map, built once.
pub(crate) fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| build_lut(&dynamic_map()))
}

/// The code of `x` (scaled to [-1, 1]; clamped) in `lut`.
pub(crate) fn lookup(lut: &[u8], x: f32) -> u8 {
    #[allow(clippy::cast_precision_loss)]
    let pos = (x.clamp(-1.0, 1.0) + 1.0) * 0.5 * (BINS - 1) as f32 + 0.5;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bin = pos as usize;
    lut[bin.min(BINS - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_entries_map_to_themselves_and_ends_clamp() {
        let map = dynamic_map();
        let lut = dynamic_lut();
        for (i, &v) in map.iter().enumerate().skip(1) {
            // Entries farther apart than a bin are found exactly.
            if (v - map[i - 1]).abs() > 1e-4 {
                assert_eq!(usize::from(lookup(lut, v)), i, "entry {i} = {v}");
            }
        }
        assert_eq!(lookup(lut, 1.5), 255);
        assert_eq!(lookup(lut, -1.5), 0);
        assert_eq!(build_lut(&[-1.0, 0.0, 1.0])[BINS / 2 - 1], 1);
    }
}
