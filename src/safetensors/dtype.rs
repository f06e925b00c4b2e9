//! Safetensors element types and their sizes.
//!
//! The format's types, as the `safetensors` library 0.8.0 lists them: BOOL,
//! F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ,
//! F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64.
//! Every whole-byte one is supported; the three sub-byte ones are refused.

use std::fmt;

/// A safetensors dtype that can be consolidated (every type of whole bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[allow(missing_docs, non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E4M3,
    F8_E5M2,
    F8_E8M0,
    F8_E4M3FNUZ,
    F8_E5M2FNUZ,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    /// complex64: two F32, real then imaginary.
    C64,
    F64,
    I64,
    U64,
}

/// Why a dtype string was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DtypeError {
    /// A real safetensors type whose elements are smaller than a byte.
    SubByte,
    /// Not a safetensors type at all.
    Unknown,
}

impl Dtype {
    /// Every supported dtype.
    pub const ALL: [Dtype; 19] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Bytes per element.
    pub fn size(self) -> u64 {
        use Dtype::*;
        match self {
            BOOL | U8 | I8 | F8_E4M3 | F8_E5M2 | F8_E8M0 | F8_E4M3FNUZ | F8_E5M2FNUZ => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            C64 | F64 | I64 | U64 => 8,
        }
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            BOOL => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8_E4M3 => "F8_E4M3",
            F8_E5M2 => "F8_E5M2",
            F8_E8M0 => "F8_E8M0",
            F8_E4M3FNUZ => "F8_E4M3FNUZ",
            F8_E5M2FNUZ => "F8_E5M2FNUZ",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            C64 => "C64",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
        }
    }

    /// Parses a header dtype name.
    pub fn parse(name: &str) -> Result<Dtype, DtypeError> {
        if let Some(dtype) = Dtype::ALL.iter().find(|d| d.name() == name) {
            return Ok(*dtype);
        }
        // Sub-byte types pack several elements per byte; a piece boundary can
        // fall inside a byte, so byte-level consolidation would be wrong.
        const SUB_BYTE: [&str; 3] = ["F4", "F6_E2M3", "F6_E3M2"];
        if SUB_BYTE.contains(&name) {
            Err(DtypeError::SubByte)
        } else {
            Err(DtypeError::Unknown)
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// What `--dtype` and `--dtype-map` convert, decided where the plan (which
// sizes outputs) and verification (which checks them) can both see it.

/// Whether `dtype` is one that `--dtype` converts: F16, BF16, F32, F64.
pub fn is_convertible(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// The dtypes `--dtype` (and `--dtype-map`) can convert to.
pub const TARGETS: [Dtype; 4] = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64];

/// The FP8 types a `--dtype-map` may restore from (the FNUZ ones are kept).
pub const FP8_SOURCES: [Dtype; 3] = [Dtype::F8_E4M3, Dtype::F8_E5M2, Dtype::F8_E8M0];

/// Whether [`crate::exec::convert::convert`] handles `from` → `to`.
pub fn can_convert(from: Dtype, to: Dtype) -> bool {
    from == to || ((is_convertible(from) || FP8_SOURCES.contains(&from)) && TARGETS.contains(&to))
}

/// The output dtype of a tensor of `dtype` under `--dtype target`:
/// floating-point tensors take the target, all others keep their type.
pub fn output_dtype(dtype: Dtype, target: Option<Dtype>) -> Dtype {
    match target {
        Some(target) if is_convertible(dtype) => target,
        _ => dtype,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for dtype in Dtype::ALL {
            assert_eq!(Dtype::parse(dtype.name()), Ok(dtype));
        }
    }

    #[test]
    fn sizes_match_the_format() {
        assert_eq!(Dtype::BOOL.size(), 1);
        assert_eq!(Dtype::F8_E8M0.size(), 1);
        assert_eq!(Dtype::BF16.size(), 2);
        assert_eq!(Dtype::U32.size(), 4);
        assert_eq!(Dtype::U64.size(), 8);
        assert_eq!(Dtype::C64.size(), 8);
        assert_eq!(Dtype::F8_E4M3FNUZ.size(), 1);
        assert_eq!(Dtype::F8_E5M2FNUZ.size(), 1);
    }

    #[test]
    fn every_whole_byte_type_of_the_format_is_supported() {
        // The list safetensors 0.8.0 gives in its "unknown variant" error.
        let format = [
            "BOOL",
            "F4",
            "F6_E2M3",
            "F6_E3M2",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "F8_E8M0",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "C64",
            "F64",
            "I64",
            "U64",
        ];
        let supported: Vec<&str> = format
            .iter()
            .copied()
            .filter(|name| Dtype::parse(name).is_ok())
            .collect();
        assert_eq!(supported.len(), Dtype::ALL.len());
        assert_eq!(
            format.len() - supported.len(),
            3,
            "only F4, F6_E2M3, F6_E3M2 are refused"
        );
    }

    #[test]
    fn sub_byte_and_unknown_types_are_refused() {
        assert_eq!(Dtype::parse("F4"), Err(DtypeError::SubByte));
        assert_eq!(Dtype::parse("F6_E2M3"), Err(DtypeError::SubByte));
        assert_eq!(Dtype::parse("F6_E3M2"), Err(DtypeError::SubByte));
        assert_eq!(Dtype::parse("bf16"), Err(DtypeError::Unknown));
        assert_eq!(Dtype::parse("C128"), Err(DtypeError::Unknown));
        assert_eq!(Dtype::parse("U4"), Err(DtypeError::Unknown));
        assert_eq!(Dtype::parse("F4X"), Err(DtypeError::Unknown));
    }
}
