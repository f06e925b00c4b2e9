//! Walking the `.metadata` pickle's values into [`Entry`]s, chunks and
//! storage locations, refusing anything that is not DCP's layout.

use super::{
    Chunk, DCP_METADATA, Entry, MetadataError, Parsed, StorageInfo, TensorMeta, TorchDtype, fail,
    in_entry,
};
use crate::checkpoint::dcp::pickle::{Object, Pickle, Value};
use crate::checkpoint::dcp::torch_types::torch_dtype;
use std::collections::HashMap;

pub(super) struct Reader<'p> {
    pub(super) pickle: &'p Pickle,
}

impl<'p> Reader<'p> {
    /// The value as an object of class `module.name` (or of `name` under an
    /// older module path for the classes that moved).
    pub(super) fn object_of(
        &self,
        value: Value,
        module: &str,
        name: &str,
        what: &str,
    ) -> Parsed<&'p Object> {
        match self.pickle.object(value) {
            Some(object) if object.class.name == name && moved_ok(object, module) => Ok(object),
            _ => fail(format!(
                "{what} is a {}, not a {module}.{name}",
                self.pickle.describe(value)
            )),
        }
    }

    /// An object's attributes: its BUILD state as a dict, also in the
    /// `(dict, slots)` form Python uses for classes with `__slots__`.
    pub(super) fn fields(&self, object: &Object, what: &str) -> Parsed<&'p [(Value, Value)]> {
        let Some(state) = object.state else {
            return fail(format!("{what} has no attributes"));
        };
        if let Some(pairs) = self.pickle.dict(state) {
            return Ok(pairs);
        }
        if let Some([dict, slots]) = self.pickle.tuple(state) {
            for part in [*slots, *dict] {
                if let Some(pairs) = self.pickle.dict(part) {
                    return Ok(pairs);
                }
            }
        }
        fail(format!(
            "{what}'s attributes are a {}, not a dict",
            self.pickle.describe(state)
        ))
    }

    pub(super) fn field(&self, pairs: &[(Value, Value)], key: &str) -> Option<Value> {
        self.pickle.dict_get(pairs, key)
    }

    pub(super) fn entry(&self, key: Value, value: Value) -> Parsed<Entry> {
        let Some(name) = self.pickle.str(key) else {
            return fail(format!(
                "state_dict_metadata has a key that is a {}, not a string",
                self.pickle.describe(key)
            ));
        };
        let class = self.pickle.object(value).map(|o| o.class);
        match class {
            Some(class) if class.is(DCP_METADATA, "BytesStorageMetadata") => {
                Ok(Entry::NonTensor(name.to_owned()))
            }
            Some(class) if class.is(DCP_METADATA, "TensorStorageMetadata") => self
                .tensor(name, value)
                .map(Entry::Tensor)
                .map_err(in_entry(name)),
            _ => Err(MetadataError {
                tensor: Some(name.to_owned()),
                reason: format!(
                    "is a {}, not TensorStorageMetadata or BytesStorageMetadata",
                    self.pickle.describe(value)
                ),
            }),
        }
    }

    fn tensor(&self, name: &str, value: Value) -> Parsed<TensorMeta> {
        let object = self.object_of(value, DCP_METADATA, "TensorStorageMetadata", "it")?;
        let fields = self.fields(object, "TensorStorageMetadata")?;
        let get = |key: &str| {
            self.field(fields, key)
                .map_or_else(|| fail(format!("TensorStorageMetadata has no '{key}'")), Ok)
        };
        let dtype = self.dtype(get("properties")?)?;
        let shape = self.size(get("size")?, "size")?;
        let chunks_value = get("chunks")?;
        let Some(chunk_values) = self.pickle.sequence(chunks_value) else {
            return fail(format!(
                "chunks is a {}, not a list",
                self.pickle.describe(chunks_value)
            ));
        };
        let chunks = chunk_values
            .iter()
            .map(|&chunk| self.chunk(chunk, &shape))
            .collect::<Parsed<Vec<_>>>()?;
        Ok(TensorMeta {
            name: name.to_owned(),
            dtype,
            shape,
            chunks,
        })
    }

    /// TensorProperties' dtype: the first item of its `__getstate__` tuple,
    /// or the `dtype` attribute if it was pickled as a plain dataclass.
    fn dtype(&self, properties: Value) -> Parsed<TorchDtype> {
        let object = self.object_of(properties, DCP_METADATA, "TensorProperties", "properties")?;
        let state = object.state.unwrap_or(Value::None);
        let dtype = match (self.pickle.tuple(state), self.pickle.dict(state)) {
            (Some(items), _) => items.first().copied(),
            (None, Some(pairs)) => self.field(pairs, "dtype"),
            (None, None) => None,
        };
        let Some(dtype) = dtype else {
            return fail("TensorProperties has no dtype");
        };
        let global = self.pickle.global(dtype).filter(|g| g.module == "torch");
        match global.and_then(|g| torch_dtype(g.name).map(|d| (g.name, d))) {
            Some((_, Some(supported))) => Ok(TorchDtype::Supported(supported)),
            Some((name, None)) => Ok(TorchDtype::Unsupported(name)),
            None => fail(format!(
                "dtype is a {}, not a torch dtype",
                self.pickle.describe(dtype)
            )),
        }
    }

    /// A `torch.Size` (or plain tuple/list) of non-negative ints.
    fn size(&self, value: Value, what: &str) -> Parsed<Vec<u64>> {
        let dims = match self.pickle.object(value) {
            Some(object) if object.class.is("torch", "Size") => {
                match self.pickle.tuple(object.args) {
                    Some([dims]) => *dims,
                    _ => return fail(format!("{what}: torch.Size takes one tuple")),
                }
            }
            _ => value,
        };
        let Some(items) = self.pickle.sequence(dims) else {
            return fail(format!(
                "{what} is a {}, not a torch.Size",
                self.pickle.describe(value)
            ));
        };
        items
            .iter()
            .map(|&item| match item {
                Value::Int(n) if n >= 0 => Ok(n as u64),
                other => fail(format!(
                    "{what} has a {}, not a non-negative int",
                    self.pickle.describe(other)
                )),
            })
            .collect()
    }

    fn chunk(&self, value: Value, shape: &[u64]) -> Parsed<Chunk> {
        let object = self.object_of(value, DCP_METADATA, "ChunkStorageMetadata", "a chunk")?;
        let fields = self.fields(object, "ChunkStorageMetadata")?;
        let (Some(offsets), Some(sizes)) =
            (self.field(fields, "offsets"), self.field(fields, "sizes"))
        else {
            return fail("ChunkStorageMetadata lacks offsets or sizes");
        };
        let chunk = Chunk {
            offsets: self.size(offsets, "chunk offsets")?,
            sizes: self.size(sizes, "chunk sizes")?,
        };
        check_chunk_inside(&chunk, shape)?;
        Ok(chunk)
    }

    pub(super) fn storage_data(
        &self,
        value: Value,
    ) -> Parsed<HashMap<(String, Vec<u64>), StorageInfo>> {
        let Some(pairs) = self.pickle.dict(value) else {
            return fail(format!(
                "storage_data is a {}, not FileSystemWriter's dict of chunk locations",
                self.pickle.describe(value)
            ));
        };
        let mut storage = HashMap::with_capacity(pairs.len());
        for &(key, info) in pairs {
            let (fqn, offsets) = self.metadata_index(key)?;
            let info = self.storage_info(info).map_err(in_entry(&fqn))?;
            // Non-tensor entries have no offsets; they are not read.
            let Some(offsets) = offsets else { continue };
            let key = (fqn, offsets);
            if storage.contains_key(&key) {
                return Err(MetadataError {
                    tensor: Some(key.0),
                    reason: format!("storage_data lists chunk {:?} twice", key.1),
                });
            }
            storage.insert(key, info);
        }
        Ok(storage)
    }

    fn metadata_index(&self, value: Value) -> Parsed<(String, Option<Vec<u64>>)> {
        let object = self.object_of(value, DCP_METADATA, "MetadataIndex", "a storage_data key")?;
        let fields = self.fields(object, "MetadataIndex")?;
        let fqn = self.field(fields, "fqn").and_then(|v| self.pickle.str(v));
        let Some(fqn) = fqn else {
            return fail("MetadataIndex has no fqn string");
        };
        let offsets = match self.field(fields, "offset") {
            None | Some(Value::None) => None,
            Some(offset) => Some(
                self.size(offset, "MetadataIndex offset")
                    .map_err(in_entry(fqn))?,
            ),
        };
        Ok((fqn.to_owned(), offsets))
    }

    fn storage_info(&self, value: Value) -> Parsed<StorageInfo> {
        let object = self.object_of(
            value,
            "torch.distributed.checkpoint.filesystem",
            "_StorageInfo",
            "a storage_data value",
        )?;
        let fields = self.fields(object, "_StorageInfo")?;
        let relative_path = self
            .field(fields, "relative_path")
            .and_then(|v| self.pickle.str(v));
        let int = |key| match self.field(fields, key) {
            Some(Value::Int(n)) if n >= 0 => Some(n as u64),
            _ => None,
        };
        let (Some(relative_path), Some(offset), Some(length)) =
            (relative_path, int("offset"), int("length"))
        else {
            return fail("_StorageInfo lacks a relative_path, offset or length");
        };
        let transforms = match self.field(fields, "transform_descriptors") {
            None | Some(Value::None) => Vec::new(),
            Some(list) => self.strings(list, "transform_descriptors")?,
        };
        Ok(StorageInfo {
            relative_path: relative_path.to_owned(),
            offset,
            length,
            transforms,
        })
    }

    fn strings(&self, value: Value, what: &str) -> Parsed<Vec<String>> {
        let Some(items) = self.pickle.sequence(value) else {
            return fail(format!("{what} is a {}", self.pickle.describe(value)));
        };
        items
            .iter()
            .map(|&item| {
                self.pickle
                    .str(item)
                    .map(str::to_owned)
                    .map_or_else(|| fail(format!("{what} holds a non-string")), Ok)
            })
            .collect()
    }
}

/// Classes that lived elsewhere in older PyTorch are accepted under their old
/// module too (the allowlist already limits which).
fn moved_ok(object: &Object, module: &str) -> bool {
    object.class.module == module
        || (object.class.name == "TensorProperties"
            && object.class.module == "torch.distributed._shard.sharded_tensor.metadata")
}

fn check_chunk_inside(chunk: &Chunk, shape: &[u64]) -> Parsed<()> {
    if chunk.offsets.len() != shape.len() || chunk.sizes.len() != shape.len() {
        return fail(format!(
            "chunk at {:?} of shape {:?} does not have the tensor's {} dimensions",
            chunk.offsets,
            chunk.sizes,
            shape.len()
        ));
    }
    let inside = chunk
        .offsets
        .iter()
        .zip(&chunk.sizes)
        .zip(shape)
        .all(|((&start, &len), &full)| start.checked_add(len).is_some_and(|end| end <= full));
    if !inside {
        return fail(format!(
            "chunk at {:?} of shape {:?} lies outside the full shape {shape:?}",
            chunk.offsets, chunk.sizes
        ));
    }
    Ok(())
}
