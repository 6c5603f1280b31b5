//! f32 weights stored as a GGUF tensor type, bit for bit as ggml's reference code (and
//! llama.cpp's converter, which matches it) stores them.

use super::file::TensorType;

/// `values` as little-endian bytes of `ty`. For Q8_0, `values.len()` is a multiple of 32.
pub fn encode(values: &[f32], ty: TensorType) -> Vec<u8> {
    match ty {
        TensorType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // Round to nearest, ties to even (ggml's conversions).
        TensorType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        TensorType::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        TensorType::Q8_0 => q8_0(values),
    }
}

/// Blocks of 32: the scale d = max|x| / 127 stored as f16, then each x × (1/d) rounded half
/// away from zero to a signed byte (d computed and applied in f32, as ggml's
/// `quantize_row_q8_0_ref` does; an all-zero block has d = 0 and bytes 0).
fn q8_0(values: &[f32]) -> Vec<u8> {
    debug_assert_eq!(values.len() % TensorType::Q8_0_BLOCK, 0, "Q8_0 takes whole blocks");
    let mut out = Vec::with_capacity(values.len() / TensorType::Q8_0_BLOCK * 34);
    for block in values.chunks_exact(TensorType::Q8_0_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * inverse).round() as i8 as u8));
    }
    out
}

/// Bytes of `ty` back as f32 values (for checks and size reports).
pub fn decode(bytes: &[u8], ty: TensorType) -> Vec<f32> {
    match ty {
        TensorType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        TensorType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        TensorType::Bf16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        TensorType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|block| {
                let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                block[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_matches_ggml_reference_rounding() {
        // max 127 → d = 1: values round half away from zero; a zero block stays zero.
        let mut values = vec![0.0f32; 64];
        values[0] = 127.0;
        values[1] = 2.5;
        values[2] = -2.5;
        values[3] = -0.49;
        let bytes = encode(&values, TensorType::Q8_0);
        assert_eq!(bytes.len(), 68);
        assert_eq!(half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 1.0);
        assert_eq!(&bytes[2..6], &[127u8, 3, (-3i8) as u8, 0]);
        assert!(bytes[34..].iter().all(|&b| b == 0));
        assert_eq!(decode(&bytes, TensorType::Q8_0)[..4], [127.0, 3.0, -3.0, 0.0]);
    }
}
