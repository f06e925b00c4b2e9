//! Reading, validating and writing safetensors headers.
//!
//! Parsing never trusts a number from the file: every size is computed with
//! checked arithmetic, and the data section must be covered exactly, with no
//! holes, overlaps or trailing bytes.

mod encode;

use crate::error::{Error, Result};
use crate::safetensors::dtype::{Dtype, DtypeError};
use crate::safetensors::json::{DuplicateKey, JsonError, parse_unique_json};
pub use encode::encode_header;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The largest header accepted, the same cap as the safetensors library.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorEntry {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape; empty for a 0-dimensional scalar.
    pub shape: Vec<u64>,
    /// Start of the tensor's bytes, relative to the data section.
    pub begin: u64,
    /// End (exclusive) of the tensor's bytes, relative to the data section.
    pub end: u64,
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// Tensor entries, in data order.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` string map (empty if absent).
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset where the data section starts (8 + header length).
    pub data_start: u64,
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let bad = |reason: String| Error::BadFile {
        path: path.to_owned(),
        reason,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, shorter than the 8-byte length prefix"
        )));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io("read", path, e))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json)
        .map_err(|e| Error::io("read", path, e))?;
    parse_header(&json, file_len).map_err(|fault| match fault {
        Fault::File(reason) => bad(reason),
        Fault::Tensor(tensor, reason) => Error::BadTensor {
            path: path.to_owned(),
            tensor,
            reason,
            hint: "the shard is corrupt or was written by an incompatible tool; re-save it",
        },
        Fault::Dtype(tensor, dtype) => Error::BadTensor {
            path: path.to_owned(),
            tensor,
            reason: format!("dtype {dtype} cannot be consolidated (elements smaller than a byte)"),
            hint: "convert this tensor to a whole-byte dtype before saving",
        },
    })
}

/// What is wrong with a header, before the file name is attached.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// The header as a whole is malformed.
    File(String),
    /// One tensor entry is malformed.
    Tensor(String, String),
    /// A tensor uses a dtype that cannot be consolidated.
    Dtype(String, String),
}

/// Parses the JSON header bytes of a file that is `file_len` bytes long.
///
/// Pure, so that it can be fuzzed and tested on hand-made byte strings.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Header, Fault> {
    let file = |s: String| Fault::File(s);
    let header_len = json.len() as u64;
    let data_start = header_len
        .checked_add(8)
        .ok_or_else(|| file("header length overflows".into()))?;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or_else(|| file("header runs past the end of the file".into()))?;
    let text = std::str::from_utf8(json).map_err(|e| file(format!("header is not UTF-8: {e}")))?;
    if !text.trim_start().starts_with('{') {
        return Err(file("header is not a JSON object".into()));
    }
    let value = parse_unique_json(text).map_err(|e| match e {
        JsonError::Syntax(e) => file(format!("header is not valid JSON: {e}")),
        JsonError::Duplicate(dup) => duplicate_fault(dup),
    })?;
    let Value::Object(map) = value else {
        return Err(file("header is not a JSON object".into()));
    };

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in map {
        if name == "__metadata__" {
            let Value::Object(meta) = entry else {
                return Err(file("__metadata__ is not an object".into()));
            };
            for (key, value) in meta {
                let Value::String(value) = value else {
                    return Err(file(format!(
                        "__metadata__ value of '{key}' is not a string"
                    )));
                };
                metadata.insert(key, value);
            }
            continue;
        }
        tensors.push(parse_entry(&name, &entry)?);
    }

    // The data section must be tiled exactly, in offset order.
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut covered = 0u64;
    for tensor in &tensors {
        if tensor.begin != covered {
            let what = if tensor.begin > covered {
                "a hole"
            } else {
                "an overlap"
            };
            return Err(Fault::Tensor(
                tensor.name.clone(),
                format!(
                    "data_offsets [{}, {}] leave {what} in the data section at byte {covered}",
                    tensor.begin, tensor.end
                ),
            ));
        }
        covered = tensor.end;
    }
    if covered != data_len {
        return Err(file(format!(
            "tensors cover {covered} bytes but the data section holds {data_len} bytes"
        )));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// Why a header holding `"__metadata__"` twice is refused.
const RESERVED_TWICE: &str = "appears twice in the header: a tensor saved under the header's \
metadata key, which no safetensors file can hold (rename the tensor in the state dict, or leave it \
out, before saving)";

/// A key a header has twice: a tensor (readers would disagree on which entry
/// holds its bytes), a field of one tensor's entry, or a metadata key.
fn duplicate_fault(dup: DuplicateKey) -> Fault {
    match dup.within.as_slice() {
        // PyTorch's HF writer saves a tensor named "__metadata__" this way.
        [] if dup.key == "__metadata__" => Fault::Tensor(dup.key, RESERVED_TWICE.into()),
        [] => Fault::Tensor(dup.key, "appears twice in the header".into()),
        [meta] if meta == "__metadata__" => {
            Fault::File(format!("__metadata__ has the key '{}' twice", dup.key))
        }
        [tensor] => Fault::Tensor(
            tensor.clone(),
            format!("its entry has the key '{}' twice", dup.key),
        ),
        [tensor, ..] => Fault::Tensor(tensor.clone(), dup.to_string()),
    }
}

fn parse_entry(name: &str, entry: &Value) -> Result<TensorEntry, Fault> {
    let fault = |reason: String| Fault::Tensor(name.to_owned(), reason);
    let Value::Object(fields) = entry else {
        return Err(fault("entry is not an object".into()));
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| fault("missing or non-string \"dtype\"".into()))?;
    let dtype = match Dtype::parse(dtype_name) {
        Ok(dtype) => dtype,
        Err(DtypeError::SubByte) => return Err(Fault::Dtype(name.into(), dtype_name.into())),
        Err(DtypeError::Unknown) => return Err(fault(format!("unknown dtype \"{dtype_name}\""))),
    };
    let shape = u64_list(fields.get("shape"))
        .ok_or_else(|| fault("\"shape\" must be a list of non-negative integers".into()))?;
    let offsets = u64_list(fields.get("data_offsets"))
        .filter(|o| o.len() == 2)
        .ok_or_else(|| fault("\"data_offsets\" must be two non-negative integers".into()))?;
    let (begin, end) = (offsets[0], offsets[1]);
    let nbytes = byte_len(&shape, dtype)
        .ok_or_else(|| fault(format!("shape {shape:?} is too large: its size overflows")))?;
    if end < begin || end - begin != nbytes {
        return Err(fault(format!(
            "data_offsets [{begin}, {end}] do not match shape {shape:?} of {dtype} ({nbytes} bytes)"
        )));
    }
    Ok(TensorEntry {
        name: name.to_owned(),
        dtype,
        shape,
        begin,
        end,
    })
}

fn u64_list(value: Option<&Value>) -> Option<Vec<u64>> {
    value?.as_array()?.iter().map(Value::as_u64).collect()
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Byte length of a tensor of `shape` and `dtype`, or `None` on overflow.
pub fn byte_len(shape: &[u64], dtype: Dtype) -> Option<u64> {
    element_count(shape)?.checked_mul(dtype.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str, data_len: u64) -> Result<Header, Fault> {
        parse_header(json.as_bytes(), 8 + json.len() as u64 + data_len)
    }

    fn is_file_fault(result: Result<Header, Fault>, needle: &str) -> bool {
        matches!(result, Err(Fault::File(reason)) if reason.contains(needle))
    }

    fn is_tensor_fault(result: Result<Header, Fault>, needle: &str) -> bool {
        matches!(result, Err(Fault::Tensor(_, reason)) if reason.contains(needle))
    }

    #[test]
    fn parses_a_valid_header_with_padding_and_metadata() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},"a":{"dtype":"I16","shape":[],"data_offsets":[0,2]}}   "#;
        let parsed = header(json, 10).unwrap();
        assert_eq!(parsed.metadata["format"], "pt");
        assert_eq!(parsed.tensors[0].name, "a");
        assert_eq!(parsed.tensors[1].shape, vec![2]);
        assert_eq!(parsed.data_start, 8 + json.len() as u64);
    }

    #[test]
    fn empty_tensors_are_allowed() {
        let json = r#"{"e":{"dtype":"BF16","shape":[0,4],"data_offsets":[0,0]},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(header(json, 1).unwrap().tensors.len(), 2);
    }

    #[test]
    fn rejects_non_utf8_and_non_objects() {
        assert!(is_file_fault(parse_header(&[0xff, 0xfe], 10), "UTF-8"));
        assert!(is_file_fault(header("[1,2]", 0), "JSON object"));
        assert!(is_file_fault(header("{\"a\":", 0), "valid JSON"));
    }

    #[test]
    fn rejects_unknown_and_sub_byte_dtypes() {
        let json = r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(is_tensor_fault(header(json, 1), "unknown dtype"));
        let json = r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#;
        assert!(matches!(header(json, 1), Err(Fault::Dtype(name, _)) if name == "a"));
    }

    #[test]
    fn rejects_offsets_that_do_not_match_the_shape() {
        let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(is_tensor_fault(header(json, 4), "do not match"));
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#;
        assert!(is_tensor_fault(header(json, 4), "do not match"));
    }

    #[test]
    fn rejects_overflowing_shapes() {
        let json = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(is_tensor_fault(header(json, 8), "overflows"));
    }

    #[test]
    fn rejects_holes_overlaps_and_trailing_bytes() {
        let hole = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(is_tensor_fault(header(hole, 2), "a hole"));
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(is_tensor_fault(header(overlap, 2), "an overlap"));
        let short = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(is_file_fault(header(short, 3), "data section holds 3"));
        assert!(is_file_fault(header(short, 1), "data section holds 1"));
    }

    #[test]
    fn rejects_bad_metadata() {
        let json = r#"{"__metadata__":{"n":1}}"#;
        assert!(is_file_fault(header(json, 0), "not a string"));
        let json = r#"{"__metadata__":[]}"#;
        assert!(is_file_fault(header(json, 0), "not an object"));
    }

    #[test]
    fn a_tensor_named_twice_is_refused() {
        // serde_json alone keeps the second entry: the same bytes read as I8.
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(
            header(json, 1),
            Err(Fault::Tensor(
                "a".into(),
                "appears twice in the header".into()
            ))
        );
    }

    #[test]
    fn a_field_or_metadata_key_given_twice_is_refused() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"dtype":"I8","data_offsets":[0,1]}}"#;
        assert_eq!(
            header(json, 1),
            Err(Fault::Tensor(
                "a".into(),
                "its entry has the key 'dtype' twice".into()
            ))
        );
        let json = r#"{"__metadata__":{"format":"pt","DCP_SHARDING_INFO":"{}","format":"np"}}"#;
        assert_eq!(
            header(json, 0),
            Err(Fault::File(
                "__metadata__ has the key 'format' twice".into()
            ))
        );
        let json = r#"{"__metadata__":{},"__metadata__":{}}"#;
        assert_eq!(
            header(json, 0),
            Err(Fault::Tensor("__metadata__".into(), RESERVED_TWICE.into()))
        );
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        /// A valid header to mutate.
        fn seed() -> Vec<u8> {
            let json = r#"{"__metadata__":{"format":"pt","DCP_SHARDING_INFO":"{}"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"U8","shape":[],"data_offsets":[12,13]}}"#;
            json.as_bytes().to_vec()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            /// The same inputs as the cargo-fuzz target (fuzz/), run as a
            /// normal test: arbitrary bytes never panic the parser.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), file_len in any::<u64>()) {
                let _ = parse_header(&bytes, file_len);
            }

            /// Mutations of a valid header never panic, and whatever parses
            /// satisfies the invariants the copy relies on.
            #[test]
            fn mutated_headers_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), extra in 0u64..64) {
                let mut bytes = seed();
                for (at, byte) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                let file_len = 8 + bytes.len() as u64 + extra;
                if let Ok(header) = parse_header(&bytes, file_len) {
                    let mut end = 0;
                    for t in &header.tensors {
                        prop_assert_eq!(t.begin, end);
                        prop_assert_eq!(Some(t.end - t.begin), byte_len(&t.shape, t.dtype));
                        end = t.end;
                    }
                    prop_assert_eq!(header.data_start + end, file_len);
                }
            }
        }
    }
}
