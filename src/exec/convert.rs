//! `--dtype` export: floating-point conversion, bit-identical to PyTorch's
//! `tensor.to(dtype)` on CPU (checked against tests/fixtures/casts, written
//! by PyTorch 2.15 with scripts/make_cast_fixtures.py).
//!
//! Rounding is round-to-nearest-even everywhere. What PyTorch does differs
//! by path, and this copies it exactly:
//! - f64 → bf16/f16 rounds twice, through f32, as PyTorch converts a double
//!   to float first;
//! - a NaN cast from f32 or f64 to bf16 becomes 0xFFFF (its vectorised
//!   kernel), but one cast from f16 becomes 0x7FC0 (its scalar kernel);
//! - a NaN cast to f16 keeps its sign and top payload bits, quieted, as the
//!   F16C instruction does.
//!
//! One thing cannot be copied: PyTorch's f16 → f32 and f64 → bf16 casts give
//! a NaN other bits in the last `n % 8` elements of each call (its scalar
//! tail on AVX2: 0x7FFFFFFF and 0x7FC0) than in the rest (the payload kept,
//! and 0xFFFF), and where the calls start depends on the tensor's size, the
//! thread count and the CPU. This module gives the vectorised result
//! everywhere; either way the element is a NaN.

use crate::safetensors::dtype::Dtype;
#[cfg(test)]
use crate::safetensors::dtype::{TARGETS, can_convert, output_dtype};

/// Converts `src` (elements of `from`) into `dst` (elements of `to`).
/// `dst` must hold exactly as many elements as `src`, and the pair must
/// pass [`crate::safetensors::dtype::can_convert`].
pub fn convert(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    use Dtype::*;
    debug_assert_eq!(src.len() as u64 / from.size(), dst.len() as u64 / to.size());
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    match (from, to) {
        (BF16, F16) => map::<2, 2>(src, dst, |x| f32_to_f16(bf16_to_f32(x))),
        (BF16, F32) => map::<2, 4>(src, dst, bf16_to_f32),
        (BF16, F64) => map::<2, 8>(src, dst, |x| f32_to_f64(bf16_to_f32(x))),
        (F16, BF16) => map::<2, 2>(src, dst, |x| f32_to_bf16(f16_to_f32(x), 0x7FC0)),
        (F16, F32) => map::<2, 4>(src, dst, f16_to_f32),
        (F16, F64) => map::<2, 8>(src, dst, |x| f32_to_f64(f16_to_f32(x))),
        (F32, BF16) => map::<4, 2>(src, dst, |x| f32_to_bf16(x, 0xFFFF)),
        (F32, F16) => map::<4, 2>(src, dst, f32_to_f16),
        (F32, F64) => map::<4, 8>(src, dst, f32_to_f64),
        (F64, BF16) => map::<8, 2>(src, dst, |x| f32_to_bf16(f64_to_f32(x), 0xFFFF)),
        (F64, F16) => map::<8, 2>(src, dst, |x| f32_to_f16(f64_to_f32(x))),
        (F64, F32) => map::<8, 4>(src, dst, f64_to_f32),
        // FP8 (restored by --dtype-map): every value is exact in f32, and
        // PyTorch converts through f32.
        (F8_E4M3 | F8_E5M2 | F8_E8M0, _) => {
            let decode = match from {
                F8_E4M3 => e4m3_to_f32,
                F8_E5M2 => e5m2_to_f32,
                _ => e8m0_to_f32,
            };
            match to {
                BF16 => map::<1, 2>(src, dst, |x| f32_to_bf16(decode(x), FP8_BF16_NAN)),
                F16 => map::<1, 2>(src, dst, |x| f32_to_f16(decode(x))),
                F32 => map::<1, 4>(src, dst, decode),
                F64 => map::<1, 8>(src, dst, |x| f32_to_f64(decode(x))),
                _ => unreachable!("no conversion from {from} to {to}"),
            }
        }
        // Callers check can_convert.
        _ => unreachable!("no conversion from {from} to {to}"),
    }
}

/// The bf16 a NaN from an FP8 type becomes.
const FP8_BF16_NAN: u16 = 0x7FC0;

/// f32 → f64 bits: exact; a NaN keeps its payload and is quieted, as the
/// hardware conversion does.
fn f32_to_f64(x: u64) -> u64 {
    (f64::from(f32::from_bits(x as u32))).to_bits()
}

/// float8_e4m3fn → f32 bits: exact. The same bit arithmetic as PyTorch's
/// `fp8e4m3fn_to_fp32_value`, so NaN (S.1111.111) gives the same bits.
fn e4m3_to_f32(x: u64) -> u64 {
    let w = (x as u32) << 24;
    let sign = w & 0x8000_0000;
    let nonsign = w & 0x7FFF_FFFF;
    let renorm_shift = nonsign.leading_zeros().saturating_sub(4);
    let inf_nan_mask = (((nonsign.wrapping_add(0x0100_0000)) as i32 >> 8) as u32) & 0x7F80_0000;
    let zero_mask = ((nonsign.wrapping_sub(1)) as i32 >> 31) as u32;
    let value = ((nonsign << renorm_shift >> 4)
        .wrapping_add((0x78u32.wrapping_sub(renorm_shift)) << 23)
        | inf_nan_mask)
        & !zero_mask;
    u64::from(sign | value)
}

/// float8_e5m2 → f32 bits: exact; it is the top byte of an f16.
fn e5m2_to_f32(x: u64) -> u64 {
    f16_to_f32(x << 8)
}

/// float8_e8m0fnu (a biased power of two, no sign) → f32 bits: exact;
/// 0x00 is 2^-127 (an f32 subnormal). 0xFF is NaN, and PyTorch gives it the
/// bits 0x7F800001 (a signalling NaN), which later casts quieten.
fn e8m0_to_f32(x: u64) -> u64 {
    match x as u32 {
        0xFF => 0x7F80_0001,
        0 => 0x0040_0000,
        e => u64::from(e << 23),
    }
}

/// Applies `f` to each little-endian element of `src`, writing `dst`.
fn map<const S: usize, const D: usize>(src: &[u8], dst: &mut [u8], f: impl Fn(u64) -> u64) {
    for (s, d) in src.chunks_exact(S).zip(dst.chunks_exact_mut(D)) {
        let mut bytes = [0u8; 8];
        bytes[..S].copy_from_slice(s);
        let out = f(u64::from_le_bytes(bytes)).to_le_bytes();
        d.copy_from_slice(&out[..D]);
    }
}

/// bf16 → f32 bits: exact.
fn bf16_to_f32(x: u64) -> u64 {
    x << 16
}

/// f16 → f32 bits: exact (subnormals normalised, NaN payload kept, quieted).
fn f16_to_f32(x: u64) -> u64 {
    let h = x as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1F;
    let man = h & 0x3FF;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: shift until the implicit bit appears.
            let shift = man.leading_zeros() - 21;
            let man = (man << shift) & 0x3FF;
            sign | ((113 - shift) << 23) | (man << 13)
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        // NaN: payload kept and quieted, as the F16C instruction does.
        (0x1F, _) => sign | 0x7FC0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    u64::from(bits)
}

/// f64 → f32 bits, rounding to nearest even (the hardware conversion).
fn f64_to_f32(x: u64) -> u64 {
    u64::from((f64::from_bits(x) as f32).to_bits())
}

/// f32 → bf16, round to nearest even; NaN becomes `nan`.
fn f32_to_bf16(x: u64, nan: u16) -> u64 {
    let u = x as u32;
    if (u & 0x7FFF_FFFF) > 0x7F80_0000 {
        return u64::from(nan);
    }
    let bias = 0x7FFF + ((u >> 16) & 1);
    u64::from((u.wrapping_add(bias) >> 16) as u16)
}

/// f32 → f16, round to nearest even, with the F16C instruction's NaN rule.
fn f32_to_f16(x: u64) -> u64 {
    let u = x as u32;
    let sign = ((u >> 16) & 0x8000) as u16;
    let abs = u & 0x7FFF_FFFF;
    let h = if abs > 0x7F80_0000 {
        // NaN: quieted, top payload bits kept.
        0x7E00 | ((abs >> 13) & 0x3FF) as u16
    } else if abs >= 0x477F_F000 {
        // 65520 and above (and infinity) round to infinity.
        0x7C00
    } else if abs >= 0x3880_0000 {
        // Normal in f16: re-bias the exponent, round the mantissa; a carry
        // moves into the exponent, which is what rounding up should do.
        let rebased = abs - ((127 - 15) << 23);
        ((rebased + 0x0FFF + ((rebased >> 13) & 1)) >> 13) as u16
    } else {
        subnormal_f16(abs)
    };
    u64::from(sign | h)
}

/// The f16 bits of a positive f32 below the smallest normal f16 (2^-14).
fn subnormal_f16(abs: u32) -> u16 {
    let exp = abs >> 23;
    // The value is man * 2^(exp - 150); in f16 subnormal units of 2^-24 it is
    // man >> (126 - exp). Below 2^-25 (exp < 102) everything rounds to zero.
    if exp < 102 {
        return 0;
    }
    let man = (abs & 0x7F_FFFF) | 0x80_0000;
    let shift = 126 - exp;
    let kept = man >> shift;
    let rest = man & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let up = rest > half || (rest == half && kept & 1 == 1);
    (kept + u32::from(up)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/casts")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn dtype(name: &str) -> Dtype {
        match name {
            "bf16" => Dtype::BF16,
            "f16" => Dtype::F16,
            "f32" => Dtype::F32,
            "f8e4m3" => Dtype::F8_E4M3,
            "f8e5m2" => Dtype::F8_E5M2,
            "f8e8m0" => Dtype::F8_E8M0,
            _ => Dtype::F64,
        }
    }

    /// Every 8- and 16-bit input (exhaustive) and ~60,000 f32 and f64 values
    /// (specials, NaN payloads, subnormals, ties, random bits) against what
    /// PyTorch 2.15 wrote.
    #[test]
    fn conversions_match_pytorch_bit_for_bit() {
        for (from, to) in [
            ("bf16", "f16"),
            ("bf16", "f32"),
            ("f16", "bf16"),
            ("f16", "f32"),
            ("f32", "bf16"),
            ("f32", "f16"),
            ("f64", "bf16"),
            ("f64", "f16"),
            ("f64", "f32"),
            ("bf16", "f64"),
            ("f16", "f64"),
            ("f32", "f64"),
            ("f8e4m3", "bf16"),
            ("f8e4m3", "f16"),
            ("f8e4m3", "f32"),
            ("f8e4m3", "f64"),
            ("f8e5m2", "bf16"),
            ("f8e5m2", "f16"),
            ("f8e5m2", "f32"),
            ("f8e5m2", "f64"),
            ("f8e8m0", "bf16"),
            ("f8e8m0", "f16"),
            ("f8e8m0", "f32"),
            ("f8e8m0", "f64"),
        ] {
            let (src_dtype, dst_dtype) = (dtype(from), dtype(to));
            let src = fixture(&format!("{from}.bin"));
            let expected = fixture(&format!("{from}-to-{to}.bin"));
            let count = src.len() / src_dtype.size() as usize;
            assert_eq!(expected.len(), count * dst_dtype.size() as usize);
            let mut got = vec![0u8; expected.len()];
            convert(src_dtype, dst_dtype, &src, &mut got);
            let (s, d) = (src_dtype.size() as usize, dst_dtype.size() as usize);
            let wrong: Vec<String> = (0..count)
                .filter(|i| got[i * d..(i + 1) * d] != expected[i * d..(i + 1) * d])
                .take(5)
                .map(|i| {
                    format!(
                        "{:02x?} -> got {:02x?}, torch {:02x?}",
                        &src[i * s..(i + 1) * s],
                        &got[i * d..(i + 1) * d],
                        &expected[i * d..(i + 1) * d]
                    )
                })
                .collect();
            assert!(wrong.is_empty(), "{from} -> {to}: {wrong:#?}");
        }
    }

    #[test]
    fn only_floats_change_type() {
        assert_eq!(output_dtype(Dtype::F32, Some(Dtype::BF16)), Dtype::BF16);
        assert_eq!(output_dtype(Dtype::I64, Some(Dtype::BF16)), Dtype::I64);
        assert_eq!(
            output_dtype(Dtype::F8_E4M3, Some(Dtype::F16)),
            Dtype::F8_E4M3
        );
        assert_eq!(output_dtype(Dtype::F64, None), Dtype::F64);
        // Complex and the FNUZ fp8 types are copied as they are.
        for kept in [Dtype::C64, Dtype::F8_E4M3FNUZ, Dtype::F8_E5M2FNUZ] {
            for target in TARGETS {
                assert_eq!(output_dtype(kept, Some(target)), kept);
                assert!(!can_convert(kept, target));
            }
        }
    }
}
