//! The host-side form of an NF4-quantized tensor, in bitsandbytes' layout.

/// The per-block scales of an [`Nf4Data`]: plain `f32`, or double-quantized to 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One `f32` absmax per block (bitsandbytes without `compress_statistics`).
    Plain(Vec<f32>),
    /// Absmax minus its mean, quantized to 8 bits in blocks of 256 (QLoRA's double quantization).
    Double(DoubleQuant),
}

/// Double-quantized block scales (Dettmers et al. 2023, §3 "Double Quantization"):
/// `absmax[b] = code_map[codes[b]] · nested_absmax[b / block_size] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per 4-bit block (index into `code_map`).
    pub codes: Vec<u8>,
    /// One `f32` scale per nested block of `block_size` codes.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry code book (bitsandbytes' signed dynamic map, [`super::dynamic_map`]).
    pub code_map: Vec<f32>,
    /// The mean of the original absmax values, added back after dequantization.
    pub offset: f32,
    /// Codes per nested block (256 in bitsandbytes).
    pub block_size: usize,
}

/// An NF4-quantized tensor: 4-bit codes, two per byte, with per-block absmax scaling over the
/// row-major flattened tensor (bitsandbytes' `quant_type = "nf4"` layout).
///
/// Dequantization: `w[i] = quant_map[code[i]] · absmax[i / block_size]`, where `code[2k]` is the
/// high nibble of `packed[k]` and `code[2k+1]` its low nibble.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Data {
    /// The tensor's shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// Elements per absmax block (64 in bitsandbytes' default).
    pub block_size: usize,
    /// `ceil(numel / 2)` bytes; the first element of each pair is in the high nibble.
    pub packed: Vec<u8>,
    /// The 16 levels the codes index ([`super::NF4_LEVELS`] for NF4).
    pub quant_map: [f32; 16],
    /// The block scales.
    pub absmax: Absmax,
}

impl DoubleQuant {
    /// The dequantized absmax values, `f32` exactly as bitsandbytes computes them
    /// (`code_map[code] · nested_absmax + offset`, one rounding per operation).
    pub fn dequantize(&self) -> Vec<f32> {
        double_quant_scales(
            &self.codes,
            &self.nested_absmax,
            &self.code_map,
            self.offset,
            self.block_size,
        )
    }
}

/// [`DoubleQuant::dequantize`] on its parts (also read straight from device tensors):
/// `code_map[codes[b]] · nested[b / block_size] + offset`, one rounding per operation.
///
/// # Panics
/// If a code or a nested index falls outside `code_map` or `nested`.
pub(crate) fn double_quant_scales(
    codes: &[u8],
    nested: &[f32],
    code_map: &[f32],
    offset: f32,
    block_size: usize,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(b, &c)| code_map[usize::from(c)] * nested[b / block_size] + offset)
        .collect()
}

/// Elements per parallel task of [`dequantize_packed`] (even: a task starts on a byte's high
/// nibble).
const CHUNK: usize = 1 << 15;

/// `w[i] = quant_map[code(i)] · absmax[i / block_size]` for `i < n`, `code(2k)` the high nibble
/// of `packed[k]` and `code(2k + 1)` its low nibble — in parallel chunks, written once each.
///
/// # Panics
/// If `packed` holds fewer than `⌈n/2⌉` bytes, `absmax` fewer than `⌈n/block_size⌉` scales,
/// `quant_map` fewer than 16 levels, or `block_size` is 0.
pub(crate) fn dequantize_packed(
    packed: &[u8],
    quant_map: &[f32],
    absmax: &[f32],
    block_size: usize,
    n: usize,
) -> Vec<f32> {
    assert!(
        block_size > 0
            && packed.len() >= n.div_ceil(2)
            && absmax.len() >= n.div_ceil(block_size)
            && quant_map.len() >= 16,
        "NF4 parts too short for {n} elements"
    );
    let qm: [f32; 16] = quant_map[..16].try_into().expect("16 levels");
    let fill = |at: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
        for (j, o) in out.iter_mut().enumerate() {
            let i = at + j;
            let byte = packed[i / 2];
            let code = if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0F
            };
            o.write(qm[usize::from(code)] * absmax[i / block_size]);
        }
    };
    // SAFETY: `fill` writes every element of each chunk, one per index.
    #[allow(unsafe_code)]
    unsafe {
        crate::fused::simd::par_written(n, CHUNK, fill)
    }
}

impl Absmax {
    /// The `f32` scale of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double(d) => d.dequantize(),
        }
    }

    /// The number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    /// Whether there are no blocks (an empty tensor).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Nf4Data {
    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The 4-bit codes, one per element (unpacked).
    pub fn codes(&self) -> Vec<u8> {
        let n = self.numel();
        self.packed
            .iter()
            .flat_map(|&b| [b >> 4, b & 0x0F])
            .take(n)
            .collect()
    }

    /// The dequantized tensor, row-major `f32`.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax.values();
        dequantize_packed(
            &self.packed,
            &self.quant_map,
            &absmax,
            self.block_size,
            self.numel(),
        )
    }

    /// Bytes this tensor takes in memory: packed codes, block scales and code books.
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double(d) => d.codes.len() + 4 * (d.nested_absmax.len() + d.code_map.len() + 1),
        };
        self.packed.len() + scales + 4 * self.quant_map.len()
    }

    /// Checks that the parts fit together: packed length, block counts, code book sizes.
    ///
    /// # Errors
    /// [`crate::Error::Nf4`] describing the first inconsistency.
    pub fn validate(&self) -> crate::Result<()> {
        self.check()
            .map_err(|message| crate::Error::Nf4 { message })
    }

    fn check(&self) -> Result<(), String> {
        let n = self.numel();
        if self.block_size == 0 {
            return Err("block size 0".into());
        }
        if self.packed.len() != n.div_ceil(2) {
            return Err(format!(
                "{} packed bytes for {n} elements (shape {:?}), expected {}",
                self.packed.len(),
                self.shape,
                n.div_ceil(2)
            ));
        }
        let blocks = n.div_ceil(self.block_size);
        if self.absmax.len() != blocks {
            return Err(format!(
                "{} absmax values for {n} elements in blocks of {}, expected {blocks}",
                self.absmax.len(),
                self.block_size
            ));
        }
        if let Absmax::Double(d) = &self.absmax {
            if d.block_size == 0 || d.nested_absmax.len() != blocks.div_ceil(d.block_size) {
                return Err(format!(
                    "{} nested absmax values for {blocks} blocks in nested blocks of {}, expected {}",
                    d.nested_absmax.len(),
                    d.block_size,
                    blocks.div_ceil(d.block_size.max(1))
                ));
            }
            if d.code_map.len() != 256 {
                return Err(format!(
                    "nested quant map has {} entries, expected 256",
                    d.code_map.len()
                ));
            }
        }
        Ok(())
    }
}
