//! PyTorch's names for dtypes, storages, layouts and memory formats, as they
//! appear as globals in DCP pickles, and how dtypes map to safetensors.

use crate::safetensors::dtype::Dtype;

/// Every `torch.dtype` by the name its pickle uses (`torch.<name>`), with
/// the safetensors dtype holding the same bytes, if any.
///
/// The `fnuz` float8 variants map to safetensors' own FNUZ types (a
/// different encoding from F8_E4M3/F8_E5M2), complex64 to C64. Left
/// unmapped on purpose: other complex and quantized types (no safetensors
/// type), and sub-byte and `bits` types.
pub const TORCH_DTYPES: &[(&str, Option<Dtype>)] = &[
    ("bool", Some(Dtype::BOOL)),
    ("uint8", Some(Dtype::U8)),
    ("int8", Some(Dtype::I8)),
    ("float8_e4m3fn", Some(Dtype::F8_E4M3)),
    ("float8_e5m2", Some(Dtype::F8_E5M2)),
    ("float8_e8m0fnu", Some(Dtype::F8_E8M0)),
    ("int16", Some(Dtype::I16)),
    ("uint16", Some(Dtype::U16)),
    ("float16", Some(Dtype::F16)),
    ("bfloat16", Some(Dtype::BF16)),
    ("int32", Some(Dtype::I32)),
    ("uint32", Some(Dtype::U32)),
    ("float32", Some(Dtype::F32)),
    ("float64", Some(Dtype::F64)),
    ("int64", Some(Dtype::I64)),
    ("uint64", Some(Dtype::U64)),
    ("float8_e4m3fnuz", Some(Dtype::F8_E4M3FNUZ)),
    ("float8_e5m2fnuz", Some(Dtype::F8_E5M2FNUZ)),
    ("float4_e2m1fn_x2", None),
    ("complex32", None),
    ("bcomplex32", None),
    ("complex64", Some(Dtype::C64)),
    ("complex128", None),
    ("qint8", None),
    ("quint8", None),
    ("qint32", None),
    ("quint4x2", None),
    ("quint2x4", None),
    ("bits1x8", None),
    ("bits2x4", None),
    ("bits4x2", None),
    ("bits8", None),
    ("bits16", None),
    ("int1", None),
    ("int2", None),
    ("int3", None),
    ("int4", None),
    ("int5", None),
    ("int6", None),
    ("int7", None),
    ("uint1", None),
    ("uint2", None),
    ("uint3", None),
    ("uint4", None),
    ("uint5", None),
    ("uint6", None),
    ("uint7", None),
];

/// The typed storage classes `torch.save` names in a `_rebuild_tensor_v2`
/// persistent id, with the torch dtype of their elements.
pub const TYPED_STORAGES: &[(&str, &str)] = &[
    ("DoubleStorage", "float64"),
    ("FloatStorage", "float32"),
    ("HalfStorage", "float16"),
    ("LongStorage", "int64"),
    ("IntStorage", "int32"),
    ("ShortStorage", "int16"),
    ("CharStorage", "int8"),
    ("ByteStorage", "uint8"),
    ("BoolStorage", "bool"),
    ("BFloat16Storage", "bfloat16"),
    ("ComplexDoubleStorage", "complex128"),
    ("ComplexFloatStorage", "complex64"),
    ("QUInt8Storage", "quint8"),
    ("QInt8Storage", "qint8"),
    ("QInt32Storage", "qint32"),
    ("QUInt4x2Storage", "quint4x2"),
    ("QUInt2x4Storage", "quint2x4"),
];

/// `torch.layout` values, which may be pickled as plain `torch.<name>`
/// globals (current PyTorch goes through `torch.serialization._get_layout`).
pub const LAYOUTS: &[&str] = &[
    "strided",
    "sparse_coo",
    "sparse_csr",
    "sparse_csc",
    "sparse_bsr",
    "sparse_bsc",
    "_mkldnn",
    "jagged",
];

/// `torch.memory_format` values.
pub const MEMORY_FORMATS: &[&str] = &[
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
    "legacy_contiguous_format",
];

/// Looks up a torch dtype by its pickled name: `None` if it is not a torch
/// dtype, `Some(None)` if it is one with no safetensors equivalent.
pub fn torch_dtype(name: &str) -> Option<Option<Dtype>> {
    TORCH_DTYPES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, dtype)| *dtype)
}

/// The torch dtype name of a typed storage class, if it is one.
pub fn typed_storage_dtype(class: &str) -> Option<&'static str> {
    TYPED_STORAGES
        .iter()
        .find(|(known, _)| *known == class)
        .map(|(_, dtype)| *dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_safetensors_dtype_has_exactly_one_torch_name() {
        for dtype in Dtype::ALL {
            let names = TORCH_DTYPES.iter().filter(|(_, d)| *d == Some(dtype));
            assert_eq!(names.count(), 1, "{dtype}");
        }
    }

    #[test]
    fn every_typed_storage_names_a_known_dtype() {
        for (class, dtype) in TYPED_STORAGES {
            assert!(torch_dtype(dtype).is_some(), "{class} -> {dtype}");
        }
    }

    #[test]
    fn fnuz_float8_is_not_mistaken_for_the_plain_encoding() {
        assert_eq!(
            torch_dtype("float8_e4m3fnuz"),
            Some(Some(Dtype::F8_E4M3FNUZ))
        );
        assert_eq!(torch_dtype("complex128"), Some(None));
        assert_eq!(torch_dtype("float8_e4m3fn"), Some(Some(Dtype::F8_E4M3)));
        assert_eq!(torch_dtype("os"), None);
    }
}
