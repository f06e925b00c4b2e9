//! `DCP_SHARDING_INFO`, the metadata PyTorch's `HuggingFaceStorageWriter`
//! stores in each shard: where each saved piece sits in its full tensor.

// Re-exported until every user imports them from `checkpoint`.
pub use crate::checkpoint::{FullTensor, Location, Piece};
use crate::checkpoint::{SHARD_HINTS, TensorSpec, tensor_from_pieces};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::Header;
use crate::safetensors::json::{JsonError, parse_unique_json};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// The metadata key holding the JSON-encoded sharding information.
pub const SHARDING_INFO_KEY: &str = "DCP_SHARDING_INFO";

/// One input shard file and its parsed header.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ShardFile {
    /// Path of the shard file.
    pub path: PathBuf,
    /// Its validated header.
    pub header: Header,
}

/// Decodes a shard's `DCP_SHARDING_INFO` into per-tensor piece offsets.
///
/// Returns `Ok(None)` when the file carries no DCP metadata at all.
pub fn sharding_info(shard: &ShardFile) -> Result<Option<HashMap<String, Vec<u64>>>> {
    let Some(text) = shard.header.metadata.get(SHARDING_INFO_KEY) else {
        return Ok(None);
    };
    let bad = |reason: String| Error::BadFile {
        path: shard.path.clone(),
        reason: format!("{SHARDING_INFO_KEY}: {reason}"),
    };
    let value = parse_unique_json(text).map_err(|e| match e {
        JsonError::Syntax(e) => bad(format!("not valid JSON: {e}")),
        JsonError::Duplicate(dup) => bad(dup.to_string()),
    })?;
    let Value::Object(entries) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let mut offsets = HashMap::with_capacity(entries.len());
    for (name, entry) in entries {
        let saved = entry
            .get("saved_offsets")
            .and_then(Value::as_array)
            .and_then(|list| list.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                bad(format!(
                    "entry '{name}' has no list of non-negative \"saved_offsets\""
                ))
            })?;
        offsets.insert(name, saved);
    }
    for tensor in &shard.header.tensors {
        let saved = offsets.get(&tensor.name).ok_or_else(|| Error::BadTensor {
            path: shard.path.clone(),
            tensor: tensor.name.clone(),
            reason: format!("has no entry in {SHARDING_INFO_KEY}"),
            hint: "the shard's metadata is incomplete; re-save the checkpoint",
        })?;
        if saved.len() != tensor.shape.len() {
            return Err(Error::BadTensor {
                path: shard.path.clone(),
                tensor: tensor.name.clone(),
                reason: format!(
                    "saved_offsets {saved:?} has {} dimensions but the shape {:?} has {}",
                    saved.len(),
                    tensor.shape,
                    tensor.shape.len()
                ),
                hint: "the shard's metadata is inconsistent; re-save the checkpoint",
            });
        }
    }
    if offsets.len() != shard.header.tensors.len() {
        let mut absent: Vec<&String> = offsets
            .keys()
            .filter(|name| !shard.header.tensors.iter().any(|t| &t.name == *name))
            .collect();
        absent.sort();
        return Err(bad(format!(
            "names tensor(s) absent from the file: {absent:?}"
        )));
    }
    Ok(Some(offsets))
}

/// Groups the pieces of every tensor across all shards, checks that they
/// agree and tile their full tensor exactly. Tensors come back sorted by name.
pub fn index_pieces(
    shards: &[ShardFile],
    infos: &[HashMap<String, Vec<u64>>],
) -> Result<Vec<FullTensor>> {
    // name -> (dtype, first file that defined it, pieces)
    let mut grouped: BTreeMap<&str, (Dtype, usize, Vec<Piece>)> = BTreeMap::new();
    for (shard_index, (shard, info)) in shards.iter().zip(infos).enumerate() {
        for tensor in &shard.header.tensors {
            let location = Location::at(shard_index, shard.header.data_start + tensor.begin);
            let piece = Piece::new(location, &info[&tensor.name], &tensor.shape);
            let (dtype, first, pieces) =
                grouped
                    .entry(&tensor.name)
                    .or_insert((tensor.dtype, shard_index, Vec::new()));
            let disagree = |what: String| Error::BadTensor {
                path: shard.path.clone(),
                tensor: tensor.name.clone(),
                reason: format!("{what} in {}", shards[*first].path.display()),
                hint: "the shards come from different checkpoints; use one checkpoint's files only",
            };
            if *dtype != tensor.dtype {
                return Err(disagree(format!(
                    "dtype {} differs from {dtype}",
                    tensor.dtype
                )));
            }
            if pieces[..]
                .first()
                .is_some_and(|p: &Piece| p.shape.len() != tensor.shape.len())
            {
                return Err(disagree(format!(
                    "has {} dimensions, unlike its piece",
                    tensor.shape.len()
                )));
            }
            pieces.push(piece);
        }
    }
    let paths: Vec<PathBuf> = shards.iter().map(|s| s.path.clone()).collect();
    grouped
        .into_iter()
        .map(|(name, (dtype, _, pieces))| {
            let spec = TensorSpec {
                name,
                dtype,
                shape: None,
                hints: &SHARD_HINTS,
            };
            tensor_from_pieces(&spec, pieces, &paths)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard_with_info(info: &str) -> ShardFile {
        let json = r#"{"__metadata__":{"DCP_SHARDING_INFO":"@@"},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#
            .replace("@@", &info.replace('"', "\\\""));
        let header =
            crate::safetensors::header::parse_header(json.as_bytes(), 8 + json.len() as u64 + 2)
                .unwrap();
        ShardFile {
            path: PathBuf::from("shard-00001-model-00001-of-00001.safetensors"),
            header,
        }
    }

    #[test]
    fn sharding_info_naming_a_tensor_twice_is_refused() {
        let good = shard_with_info(r#"{"w":{"saved_offsets":[4]}}"#);
        assert_eq!(sharding_info(&good).unwrap().unwrap()["w"], [4]);
        // serde_json alone keeps the last entry: the piece would silently move.
        let twice = shard_with_info(r#"{"w":{"saved_offsets":[0]},"w":{"saved_offsets":[4]}}"#);
        let err = sharding_info(&twice).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "shard-00001-model-00001-of-00001.safetensors: invalid safetensors file: DCP_SHARDING_INFO: the key 'w' appears twice\n"
            ),
            "{err}"
        );
        let field = shard_with_info(r#"{"w":{"saved_offsets":[0],"saved_offsets":[4]}}"#);
        let err = sharding_info(&field).unwrap_err().to_string();
        assert!(
            err.contains("the key 'saved_offsets' appears twice inside 'w'"),
            "{err}"
        );
    }
}
