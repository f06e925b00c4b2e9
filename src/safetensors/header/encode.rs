//! Writing a header: the length-prefixed, space-padded JSON that starts
//! every output file, for tensors laid out in a given order.

use super::TensorEntry;
use std::collections::BTreeMap;

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
    use crate::safetensors::dtype::Dtype;
    use crate::safetensors::header::parse_header;

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
}
