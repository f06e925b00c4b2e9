//! Reading, validating and writing safetensors headers.
//!
//! Parsing never trusts a number from the file: every size is computed with
//! checked arithmetic, and the data section must be covered exactly, with no
//! holes, overlaps or trailing bytes.

use crate::error::{Error, Result, shown};
use crate::safetensors::dtype::{Dtype, DtypeError};
use serde::Deserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::borrow::Cow;
use std::cell::RefCell;
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

/// A key a header has twice: a tensor (readers would disagree on which entry
/// holds its bytes), a field of one tensor's entry, or a metadata key.
fn duplicate_fault(dup: DuplicateKey) -> Fault {
    match dup.within.as_slice() {
        [] if dup.key == "__metadata__" => Fault::File("\"__metadata__\" appears twice".into()),
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

/// Why [`parse_unique_json`] refused its text.
#[derive(Debug, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON at all (serde_json's message, with line and column).
    Syntax(String),
    /// An object holds the same key twice.
    Duplicate(DuplicateKey),
}

/// A key found twice in one JSON object.
#[derive(Debug, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The repeated key.
    pub key: String,
    /// The keys leading to the object that holds it, outermost first
    /// (empty for the top-level object).
    pub within: Vec<String>,
}

impl std::fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the key '{}' appears twice", shown(&self.key))?;
        if !self.within.is_empty() {
            let path: Vec<Cow<'_, str>> = self.within.iter().map(|k| shown(k)).collect();
            write!(f, " inside '{}'", path.join("' > '"))?;
        }
        Ok(())
    }
}

/// Parses JSON text into a [`Value`], refusing any object that holds a key
/// twice. serde_json (and `json.loads`) silently keep the last of them, so a
/// repeated tensor name or mapping entry would otherwise lose the first
/// without a word, and other readers may keep a different one.
pub fn parse_unique_json(text: &str) -> Result<Value, JsonError> {
    let found = RefCell::new(None);
    let mut reader = serde_json::Deserializer::from_str(text);
    let seed = Unique {
        within: None,
        found: &found,
    };
    let parsed = seed.deserialize(&mut reader).and_then(|value| {
        reader.end()?;
        Ok(value)
    });
    match (parsed, found.into_inner()) {
        (_, Some(dup)) => Err(JsonError::Duplicate(dup)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// The key of the object being read, and the keys around it.
struct Scope<'a> {
    key: &'a str,
    parent: Option<&'a Scope<'a>>,
}

/// Builds a [`Value`] like serde_json's own deserializer, but stops at the
/// first key an object already holds, recording where it was.
#[derive(Clone, Copy)]
struct Unique<'a> {
    within: Option<&'a Scope<'a>>,
    found: &'a RefCell<Option<DuplicateKey>>,
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, reader: D) -> Result<Value, D::Error> {
        reader.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let mut within = Vec::new();
                let mut scope = self.within;
                while let Some(s) = scope {
                    within.push(s.key.to_owned());
                    scope = s.parent;
                }
                within.reverse();
                *self.found.borrow_mut() = Some(DuplicateKey { key, within });
                return Err(serde::de::Error::custom("duplicate key"));
            }
            let scope = Scope {
                key: &key,
                parent: self.within,
            };
            let value = map.next_value_seed(Unique {
                within: Some(&scope),
                found: self.found,
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Serialises a header whose tensors are laid out in the given order, and
/// returns the full prefix to write at the start of the file: the 8-byte
/// length followed by the JSON, padded with spaces so that the data section
/// starts at a multiple of 8.
pub fn encode_header(metadata: &BTreeMap<String, String>, tensors: &[TensorEntry]) -> Vec<u8> {
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map serialises"));
    }
    for tensor in tensors {
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(&tensor.name).expect("string serialises"));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            tensor.dtype,
            serde_json::to_string(&tensor.shape).expect("list serialises"),
            tensor.begin,
            tensor.end
        ));
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
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
            Err(Fault::File("\"__metadata__\" appears twice".into()))
        );
    }

    #[test]
    fn unique_json_matches_serde_json_and_names_the_repeated_key() {
        let text =
            r#"{"b":[1,-2,3.5,1e300,null,true,"s\n",{"x":{}}],"a":{"c":18446744073709551615}}"#;
        assert_eq!(
            parse_unique_json(text),
            Ok(serde_json::from_str::<Value>(text).unwrap())
        );
        let dup = |text: &str| match parse_unique_json(text) {
            Err(JsonError::Duplicate(dup)) => dup.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(dup(r#"{"k":1,"k":1}"#), "the key 'k' appears twice");
        assert_eq!(
            dup(r#"{"w":{"a":{"x":1}},"m":[{"o":{"y":1,"y":2}}]}"#),
            "the key 'y' appears twice inside 'm' > 'o'"
        );
        assert_eq!(
            dup("{\"a\\n\":{\"b\":1,\"b\":2}}"),
            "the key 'b' appears twice inside 'a\\n'"
        );
        // The same key in two different objects is fine.
        assert!(parse_unique_json(r#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
        assert!(matches!(
            parse_unique_json(r#"{"a":1} x"#),
            Err(JsonError::Syntax(e)) if e.contains("trailing")
        ));
        assert!(matches!(
            parse_unique_json(r#"{"a":1,"#),
            Err(JsonError::Syntax(_))
        ));
    }

    #[test]
    fn encoded_headers_parse_back_and_are_padded() {
        let tensors = vec![
            TensorEntry {
                name: "w\"eird".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
                begin: 0,
                end: 24,
            },
            TensorEntry {
                name: "s".into(),
                dtype: Dtype::BOOL,
                shape: vec![],
                begin: 24,
                end: 25,
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = encode_header(&meta, &tensors);
        assert_eq!(bytes.len() % 8, 0);
        let parsed = parse_header(&bytes[8..], bytes.len() as u64 + 25).unwrap();
        assert_eq!(parsed.tensors, tensors);
        assert_eq!(parsed.metadata, meta);
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
