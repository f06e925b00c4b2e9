//! The `.metadata` reader as a [`Fold`]: each of DCP's objects is taken
//! into compact tables the moment the interpreter completes it (a
//! `torch.Size` into the integer pool, a chunk into two pool offsets, ...),
//! and the parts it was built from are retired. The `Metadata` object comes
//! last and is turned into the [`Metadata`] model.
//!
//! What gets built is bounded by the file's size: every part is read once
//! (a part shared through the memo is refused as soon as it is used
//! again, a tensor entry shared by two names likewise), the chunks built
//! and the attribute pairs looked at are counted against the file's size,
//! and a tensor listing a chunk twice is refused when the tensor is read.

use super::{
    ChunkMeta, DCP_METADATA, Entry, Metadata, MetadataError, Parsed, StorageInfo, TensorMeta,
    TorchDtype, fail, in_entry,
};
use crate::checkpoint::coverage::region;
use crate::checkpoint::dcp::pickle::{Fold, FoldStop, NodeId, Object, Pickle, Value};
use crate::checkpoint::dcp::torch_types::torch_dtype;
use std::collections::{HashMap, HashSet};

/// A real chunk costs far more than this in a `.metadata` (its
/// ChunkStorageMetadata, MetadataIndex and _StorageInfo objects take over
/// 100 bytes in PyTorch's files): a file claiming more chunks than its size
/// allows at this rate is refused.
pub(super) const MIN_BYTES_PER_CHUNK: usize = 16;

/// Likewise for attribute pairs: a key and its value take at least two
/// bytes unless shared through the memo.
pub(super) const MIN_BYTES_PER_PAIR: usize = 2;

const FILESYSTEM: &str = "torch.distributed.checkpoint.filesystem";
/// Where TensorProperties lived before PyTorch 2.1.
const OLD_SHARD_METADATA: &str = "torch.distributed._shard.sharded_tensor.metadata";

/// An object taken into the tables: which table and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Folded {
    /// A `torch.Size`: `dim_sets[i]`.
    Dims(u32),
    /// A TensorProperties: `dtypes[i]`.
    Dtype(u32),
    /// A ChunkStorageMetadata: `chunks[i]`.
    Chunk(u32),
    /// A TensorStorageMetadata: `tensors[i]`.
    Tensor(u32),
    /// A MetadataIndex: `indices[i]`.
    Index(u32),
    /// A _StorageInfo: `storages[i]`.
    Storage(u32),
    /// The Metadata object itself.
    Root,
}

/// Table indices fit in the low 29 bits of a model id; the kind of table
/// is in the top 3. Ids are decoded rather than looked up, so a folded
/// object costs nothing beyond its table row.
const INDEX_BITS: u32 = 29;

impl Folded {
    /// The id handed to the interpreter for this object.
    fn encode(self) -> Parsed<u32> {
        let (kind, index) = match self {
            Folded::Dims(i) => (0, i),
            Folded::Dtype(i) => (1, i),
            Folded::Chunk(i) => (2, i),
            Folded::Tensor(i) => (3, i),
            Folded::Index(i) => (4, i),
            Folded::Storage(i) => (5, i),
            Folded::Root => (6, 0),
        };
        if index >> INDEX_BITS != 0 {
            return fail(format!("more than 2^{INDEX_BITS} objects of one kind"));
        }
        Ok(kind << INDEX_BITS | index)
    }

    /// The object an id names.
    fn decode(id: u32) -> Option<Folded> {
        let index = id & ((1 << INDEX_BITS) - 1);
        Some(match id >> INDEX_BITS {
            0 => Folded::Dims(index),
            1 => Folded::Dtype(index),
            2 => Folded::Chunk(index),
            3 => Folded::Tensor(index),
            4 => Folded::Index(index),
            5 => Folded::Storage(index),
            6 => Folded::Root,
            _ => return None,
        })
    }
}

/// A tensor entry's content, until the Metadata object names it.
struct TensorRecord {
    dtype: TorchDtype,
    shape: u32,
    /// Its chunks (`chunks` indices); taken by the first entry using it.
    chunks: Option<Vec<u32>>,
}

/// A MetadataIndex: the fqn string's node and the offsets, if any.
struct IndexRecord {
    fqn: NodeId,
    offsets: Option<u32>,
}

/// A _StorageInfo, with its path still a string node.
struct StorageRecord {
    path: NodeId,
    transforms: u32,
    offset: u64,
    length: u64,
}

/// The reader's tables, filled while the pickle is parsed.
pub(super) struct Folder {
    input: usize,
    /// Every torch.Size's integers, one after the other.
    dims: Vec<u64>,
    /// (start, length) in `dims`.
    dim_sets: Vec<(u32, u32)>,
    dtypes: Vec<TorchDtype>,
    /// (offsets, sizes), as `dim_sets` indices.
    chunks: Vec<(u32, u32)>,
    tensors: Vec<TensorRecord>,
    indices: Vec<IndexRecord>,
    storages: Vec<StorageRecord>,
    /// Transform lists seen, by node (0 is none), and their strings.
    transform_ids: HashMap<NodeId, u32>,
    transforms: Vec<Vec<String>>,
    root: Option<Metadata>,
    error: Option<MetadataError>,
    /// Chunks built into tensors so far.
    pub(super) pieces: u64,
    /// Attribute pairs looked at so far.
    pub(super) attribute_pairs: u64,
}

impl Fold for Folder {
    fn fold(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        below: Option<Value>,
        spent: &mut Vec<NodeId>,
    ) -> Result<Option<u32>, FoldStop> {
        let taken = self.take(pickle, object, below, spent).and_then(|folded| {
            let Some(folded) = folded else {
                return Ok(None);
            };
            folded.encode().map(Some)
        });
        taken.map_err(|err| {
            self.error = Some(err);
            FoldStop
        })
    }
}

/// A table index as u32: a file under the 1 GiB cap cannot fill more.
fn index(len: usize, what: &str) -> Parsed<u32> {
    u32::try_from(len).map_or_else(|_| fail(format!("more than 2^32 {what}")), Ok)
}

fn node_id(value: Value) -> Option<NodeId> {
    match value {
        Value::Node(id) => Some(id),
        _ => None,
    }
}

impl Folder {
    pub(super) fn new(input: usize) -> Folder {
        Folder {
            input,
            dims: Vec::new(),
            dim_sets: Vec::new(),
            dtypes: Vec::new(),
            chunks: Vec::new(),
            tensors: Vec::new(),
            indices: Vec::new(),
            storages: Vec::new(),
            transform_ids: HashMap::new(),
            transforms: vec![Vec::new()],
            root: None,
            error: None,
            pieces: 0,
            attribute_pairs: 0,
        }
    }

    /// The reason the reader stopped the parse.
    pub(super) fn take_error(&mut self) -> MetadataError {
        self.error.take().unwrap_or_else(|| MetadataError {
            tensor: None,
            reason: "refused by the reader".into(),
            pickle: None,
        })
    }

    /// The model, once the pickle is parsed: its root must be the Metadata.
    pub(super) fn finish(&mut self, pickle: &Pickle) -> Parsed<Metadata> {
        let root = pickle.root();
        let is_root = pickle
            .folded(root)
            .is_some_and(|id| Folded::decode(id) == Some(Folded::Root));
        match (is_root, self.root.take()) {
            (true, Some(metadata)) => Ok(metadata),
            _ => match pickle.object(root) {
                Some(object) if object.class.is(DCP_METADATA, "Metadata") => {
                    fail("Metadata has no attributes")
                }
                _ => fail(format!(
                    "the pickle is a {}, not a {DCP_METADATA}.Metadata",
                    pickle.describe(root)
                )),
            },
        }
    }

    fn take(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        below: Option<Value>,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Option<Folded>> {
        let class = object.class;
        if class.is("torch", "Size") {
            return self.size_call(pickle, object, spent).map(Some);
        }
        if object.state.is_none() {
            return Ok(None);
        }
        let dcp = class.module == DCP_METADATA;
        let folded = match class.name {
            "TensorProperties" if dcp || class.module == OLD_SHARD_METADATA => {
                self.properties(pickle, object, spent)?
            }
            "ChunkStorageMetadata" if dcp => self.chunk(pickle, object, spent)?,
            "TensorStorageMetadata" if dcp => {
                let name = below.and_then(|key| pickle.str(key)).unwrap_or("?");
                self.tensor(pickle, object, spent).map_err(in_entry(name))?
            }
            "MetadataIndex" if dcp => self.metadata_index(pickle, object, spent)?,
            "_StorageInfo" if class.module == FILESYSTEM => {
                self.storage_info(pickle, object, spent)?
            }
            "Metadata" if dcp => self.metadata(pickle, object, spent)?,
            _ => return Ok(None),
        };
        // Python's pickler gives a dataclass's NEWOBJ a fresh `()`, never
        // memoized: it is retired with the object.
        if pickle.tuple(object.args).is_some_and(<[Value]>::is_empty) {
            spent.extend(node_id(object.args));
        }
        Ok(Some(folded))
    }

    /// The `wanted` attributes of an object, in one pass over its BUILD
    /// state: a dict, or Python's `(dict, slots)` form for classes with
    /// `__slots__`. The state is retired.
    fn attributes<const N: usize>(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        wanted: [&str; N],
        what: &str,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<[Option<Value>; N]> {
        let state = object.state.unwrap_or(Value::None);
        let parts: Vec<Value> = match (pickle.dict(state), pickle.tuple(state)) {
            (Some(_), _) => vec![state],
            (None, Some([dict, slots])) => [*slots, *dict]
                .into_iter()
                .filter(|part| pickle.dict(*part).is_some())
                .collect(),
            _ => Vec::new(),
        };
        if parts.is_empty() {
            return fail(format!(
                "{what}'s attributes are a {}, not a dict",
                pickle.describe(state)
            ));
        }
        spent.extend(node_id(state));
        let mut found = [None; N];
        for part in parts {
            spent.extend(node_id(part));
            let pairs = pickle.dict(part).unwrap_or_default();
            self.count_pairs(pairs.len())?;
            for (key, value) in pairs {
                let Some(key) = pickle.str(*key) else {
                    continue;
                };
                if let Some(at) = wanted.iter().position(|w| *w == key)
                    && found[at].is_none()
                {
                    found[at] = Some(*value);
                }
            }
        }
        Ok(found)
    }

    fn count_pairs(&mut self, pairs: usize) -> Parsed<()> {
        self.attribute_pairs += pairs as u64;
        let most = (self.input / MIN_BYTES_PER_PAIR) as u64;
        if self.attribute_pairs > most {
            return fail(format!(
                "its attribute dictionaries would have this reader look at more than {most} entries, \
                 more than a {}-byte file can hold (at least {MIN_BYTES_PER_PAIR} bytes each)",
                self.input
            ));
        }
        Ok(())
    }

    fn folded_as(&self, pickle: &Pickle, value: Value) -> Option<Folded> {
        Folded::decode(pickle.folded(value)?)
    }

    /// Puts integers in the pool as a new dims set.
    fn push_dims(&mut self, pickle: &Pickle, items: &[Value], what: &str) -> Parsed<u32> {
        let start = index(self.dims.len(), "dimensions")?;
        for &item in items {
            match item {
                Value::Int(n) if n >= 0 => self.dims.push(n as u64),
                other => {
                    self.dims.truncate(start as usize);
                    return fail(format!(
                        "{what} has a {}, not a non-negative int",
                        pickle.describe(other)
                    ));
                }
            }
        }
        let id = index(self.dim_sets.len(), "sizes")?;
        self.dim_sets.push((start, items.len() as u32));
        Ok(id)
    }

    /// `torch.Size((d0, d1, ...))`, called by REDUCE: into the pool.
    fn size_call(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let Some([dims]) = pickle.tuple(object.args) else {
            return fail("torch.Size takes one tuple");
        };
        let Some(items) = pickle.sequence(*dims) else {
            return fail(format!(
                "torch.Size is given a {}, not a tuple",
                pickle.describe(*dims)
            ));
        };
        let id = self.push_dims(pickle, items, "a torch.Size")?;
        spent.extend(node_id(object.args));
        spent.extend(node_id(*dims));
        Ok(Folded::Dims(id))
    }

    /// A torch.Size, or a plain tuple or list of ints (then retired).
    fn dims_of(
        &mut self,
        pickle: &Pickle,
        value: Value,
        what: &str,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<u32> {
        if let Some(Folded::Dims(id)) = self.folded_as(pickle, value) {
            return Ok(id);
        }
        let Some(items) = pickle.sequence(value) else {
            return fail(format!(
                "{what} is a {}, not a torch.Size",
                pickle.describe(value)
            ));
        };
        let id = self.push_dims(pickle, items, what)?;
        spent.extend(node_id(value));
        Ok(id)
    }

    fn dims(&self, id: u32) -> &[u64] {
        let (start, len) = self.dim_sets[id as usize];
        &self.dims[start as usize..(start + len) as usize]
    }

    /// TensorProperties' dtype: the first item of its `__getstate__` tuple,
    /// or the `dtype` attribute if it was pickled as a plain dataclass.
    fn properties(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let state = object.state.unwrap_or(Value::None);
        let dtype = match pickle.tuple(state) {
            Some(items) => {
                spent.extend(node_id(state));
                items.first().copied()
            }
            None => self.attributes(pickle, object, ["dtype"], "TensorProperties", spent)?[0],
        };
        let Some(dtype) = dtype else {
            return fail("TensorProperties has no dtype");
        };
        let global = pickle.global(dtype).filter(|g| g.module == "torch");
        let dtype = match global.and_then(|g| torch_dtype(g.name).map(|d| (g.name, d))) {
            Some((_, Some(supported))) => TorchDtype::Supported(supported),
            Some((name, None)) => TorchDtype::Unsupported(name),
            None => {
                return fail(format!(
                    "dtype is a {}, not a torch dtype",
                    pickle.describe(dtype)
                ));
            }
        };
        let id = index(self.dtypes.len(), "dtypes")?;
        self.dtypes.push(dtype);
        Ok(Folded::Dtype(id))
    }

    fn chunk(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let what = "ChunkStorageMetadata";
        let [offsets, sizes] =
            self.attributes(pickle, object, ["offsets", "sizes"], what, spent)?;
        let (Some(offsets), Some(sizes)) = (offsets, sizes) else {
            return fail("ChunkStorageMetadata lacks offsets or sizes");
        };
        let offsets = self.dims_of(pickle, offsets, "chunk offsets", spent)?;
        let sizes = self.dims_of(pickle, sizes, "chunk sizes", spent)?;
        let id = index(self.chunks.len(), "chunks")?;
        self.chunks.push((offsets, sizes));
        Ok(Folded::Chunk(id))
    }

    fn tensor(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let what = "TensorStorageMetadata";
        let wanted = ["properties", "size", "chunks"];
        let [properties, size, chunks] = self.attributes(pickle, object, wanted, what, spent)?;
        let get = |value: Option<Value>, key: &str| {
            value.map_or_else(|| fail(format!("TensorStorageMetadata has no '{key}'")), Ok)
        };
        let properties = get(properties, "properties")?;
        let dtype = match (
            self.folded_as(pickle, properties),
            pickle.object(properties),
        ) {
            (Some(Folded::Dtype(id)), _) => self.dtypes[id as usize],
            (_, Some(object)) if object.class.name == "TensorProperties" => {
                return fail("TensorProperties has no dtype");
            }
            _ => {
                return fail(format!(
                    "properties is a {}, not a {DCP_METADATA}.TensorProperties",
                    pickle.describe(properties)
                ));
            }
        };
        let shape = self.dims_of(pickle, get(size, "size")?, "size", spent)?;
        let chunks_value = get(chunks, "chunks")?;
        let Some(items) = pickle.sequence(chunks_value) else {
            return fail(format!(
                "chunks is a {}, not a list",
                pickle.describe(chunks_value)
            ));
        };
        let mut chunks = Vec::with_capacity(items.len());
        for &item in items {
            match self.folded_as(pickle, item) {
                Some(Folded::Chunk(id)) => chunks.push(id),
                _ => {
                    return fail(format!(
                        "a chunk is a {}, not a {DCP_METADATA}.ChunkStorageMetadata",
                        pickle.describe(item)
                    ));
                }
            }
        }
        spent.extend(node_id(chunks_value));
        self.check_chunks(shape, &chunks)?;
        self.count_pieces(chunks.len())?;
        let id = index(self.tensors.len(), "tensors")?;
        self.tensors.push(TensorRecord {
            dtype,
            shape,
            chunks: Some(chunks),
        });
        Ok(Folded::Tensor(id))
    }

    /// Counts a tensor's chunks as built, unless the file cannot describe
    /// that many.
    fn count_pieces(&mut self, pieces: usize) -> Parsed<()> {
        let claimed = self.pieces + pieces as u64;
        let most = (self.input / MIN_BYTES_PER_CHUNK) as u64;
        if claimed > most {
            return fail(format!(
                "it claims at least {claimed} chunks, more than a {}-byte .metadata can describe \
                 ({most}, at {MIN_BYTES_PER_CHUNK} bytes each)",
                self.input
            ));
        }
        self.pieces = claimed;
        Ok(())
    }

    /// Every chunk inside the shape, with its dimensions, and none listed
    /// twice (refused at the second, before anything else is built).
    fn check_chunks(&self, shape: u32, chunks: &[u32]) -> Parsed<()> {
        let shape = self.dims(shape);
        let mut seen: HashSet<&[u64]> = HashSet::with_capacity(chunks.len());
        for &chunk in chunks {
            let (offsets, sizes) = self.chunks[chunk as usize];
            let (offsets, sizes) = (self.dims(offsets), self.dims(sizes));
            if offsets.len() != shape.len() || sizes.len() != shape.len() {
                return fail(format!(
                    "chunk at {offsets:?} of shape {sizes:?} does not have the tensor's {} dimensions",
                    shape.len()
                ));
            }
            let inside = offsets
                .iter()
                .zip(sizes)
                .zip(shape)
                .all(|((&start, &len), &full)| start.checked_add(len).is_some_and(|e| e <= full));
            if !inside {
                return fail(format!(
                    "chunk at {offsets:?} of shape {sizes:?} lies outside the full shape {shape:?}"
                ));
            }
            if !seen.insert(offsets) {
                return fail(format!(
                    "chunk {} is listed twice in its chunks",
                    region(offsets, sizes)
                ));
            }
        }
        Ok(())
    }

    fn metadata_index(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let wanted = ["fqn", "offset"];
        let [fqn, offset] = self.attributes(pickle, object, wanted, "MetadataIndex", spent)?;
        let fqn = fqn.filter(|v| pickle.str(*v).is_some()).and_then(node_id);
        let Some(fqn) = fqn else {
            return fail("MetadataIndex has no fqn string");
        };
        let offsets = match offset {
            None | Some(Value::None) => None,
            Some(offset) => Some(
                self.dims_of(pickle, offset, "MetadataIndex offset", spent)
                    .map_err(in_entry(pickle.str(Value::Node(fqn)).unwrap_or("?")))?,
            ),
        };
        let id = index(self.indices.len(), "storage keys")?;
        self.indices.push(IndexRecord { fqn, offsets });
        Ok(Folded::Index(id))
    }

    fn storage_info(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        let wanted = ["relative_path", "offset", "length", "transform_descriptors"];
        let [path, offset, length, transforms] =
            self.attributes(pickle, object, wanted, "_StorageInfo", spent)?;
        let int = |value: Option<Value>| match value {
            Some(Value::Int(n)) if n >= 0 => Some(n as u64),
            _ => None,
        };
        let path = path.filter(|v| pickle.str(*v).is_some()).and_then(node_id);
        let (Some(path), Some(offset), Some(length)) = (path, int(offset), int(length)) else {
            return fail("_StorageInfo lacks a relative_path, offset or length");
        };
        let transforms = match transforms {
            None | Some(Value::None) => 0,
            Some(list) => self.transforms_of(pickle, list)?,
        };
        let id = index(self.storages.len(), "storage locations")?;
        self.storages.push(StorageRecord {
            path,
            transforms,
            offset,
            length,
        });
        Ok(Folded::Storage(id))
    }

    /// A list of transform names, read once however many chunks share it.
    fn transforms_of(&mut self, pickle: &Pickle, list: Value) -> Parsed<u32> {
        let what = "transform_descriptors";
        let (Some(node), Some(items)) = (node_id(list), pickle.sequence(list)) else {
            return fail(format!("{what} is a {}", pickle.describe(list)));
        };
        if let Some(&id) = self.transform_ids.get(&node) {
            return Ok(id);
        }
        self.count_pairs(items.len())?;
        let names = items
            .iter()
            .map(|&item| {
                pickle
                    .str(item)
                    .map(str::to_owned)
                    .map_or_else(|| fail(format!("{what} holds a non-string")), Ok)
            })
            .collect::<Parsed<Vec<_>>>()?;
        let id = index(self.transforms.len(), "transform lists")?;
        self.transforms.push(names);
        self.transform_ids.insert(node, id);
        Ok(id)
    }

    /// The Metadata object: names the tensors, matches every storage_data
    /// entry to its chunk, and reads planner_data's top-level keys.
    fn metadata(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        spent: &mut Vec<NodeId>,
    ) -> Parsed<Folded> {
        if self.root.is_some() {
            return fail("it holds two Metadata objects");
        }
        let wanted = ["state_dict_metadata", "storage_data", "planner_data"];
        let [state_dict, storage, planner] =
            self.attributes(pickle, object, wanted, "Metadata", spent)?;
        let Some(state_dict) = state_dict else {
            return fail("Metadata has no state_dict_metadata");
        };
        let Some(pairs) = pickle.dict(state_dict) else {
            return fail(format!(
                "state_dict_metadata is a {}, not a dict",
                pickle.describe(state_dict)
            ));
        };
        spent.extend(node_id(state_dict));
        let mut entries = Vec::with_capacity(pairs.len());
        for &(key, value) in pairs {
            entries.push(self.entry(pickle, key, value)?);
        }
        let mut metadata = Metadata {
            entries,
            files: Vec::new(),
            transforms: std::mem::take(&mut self.transforms),
            dims: Vec::new(),
        };
        check_unique_names(&metadata.entries)?;
        let Some(storage) = storage else {
            return fail("Metadata has no storage_data");
        };
        self.attach_storage(pickle, storage, &mut metadata)?;
        spent.extend(node_id(storage));
        if let Some(planner) = planner {
            self.top_level_keys(pickle, planner, &mut metadata)?;
        }
        metadata.dims = std::mem::take(&mut self.dims);
        self.root = Some(metadata);
        Ok(Folded::Root)
    }

    fn entry(&mut self, pickle: &Pickle, key: Value, value: Value) -> Parsed<Entry> {
        let Some(name) = pickle.str(key) else {
            return fail(format!(
                "state_dict_metadata has a key that is a {}, not a string",
                pickle.describe(key)
            ));
        };
        let in_metadata = |reason: String| MetadataError {
            tensor: Some(name.to_owned()),
            reason,
            pickle: None,
        };
        if let Some(object) = pickle.object(value)
            && object.class.is(DCP_METADATA, "BytesStorageMetadata")
        {
            return Ok(Entry::NonTensor(name.to_owned()));
        }
        let Some(Folded::Tensor(id)) = self.folded_as(pickle, value) else {
            return Err(in_metadata(format!(
                "is a {}, not TensorStorageMetadata or BytesStorageMetadata",
                pickle.describe(value)
            )));
        };
        let record = &mut self.tensors[id as usize];
        let Some(chunk_ids) = record.chunks.take() else {
            return Err(in_metadata(
                "shares its TensorStorageMetadata with another entry (through the pickle memo)"
                    .into(),
            ));
        };
        let (dtype, shape) = (record.dtype, record.shape);
        let chunks = chunk_ids
            .into_iter()
            .map(|chunk| {
                let (offsets, sizes) = self.chunks[chunk as usize];
                ChunkMeta {
                    offsets: self.dim_sets[offsets as usize].0,
                    sizes: self.dim_sets[sizes as usize].0,
                    storage: None,
                }
            })
            .collect();
        Ok(Entry::Tensor(TensorMeta {
            name: name.to_owned(),
            dtype,
            shape: self.dims(shape).to_vec(),
            chunks,
            top_level_key: None,
        }))
    }

    /// Gives each chunk its storage_data location; entries of non-tensors,
    /// of no saved tensor or of no chunk of it are not needed.
    fn attach_storage(
        &mut self,
        pickle: &Pickle,
        storage: Value,
        metadata: &mut Metadata,
    ) -> Parsed<()> {
        let Some(pairs) = pickle.dict(storage) else {
            return fail(format!(
                "storage_data is a {}, not FileSystemWriter's dict of chunk locations",
                pickle.describe(storage)
            ));
        };
        let by_name: HashMap<&str, usize> = metadata
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| match entry {
                Entry::Tensor(tensor) => Some((tensor.name.as_str(), i)),
                Entry::NonTensor(_) => None,
            })
            .collect();
        // Each tensor's chunks by offsets, for the lookups below.
        let sorted: Vec<Vec<u32>> = metadata
            .entries
            .iter()
            .map(|entry| match entry {
                Entry::Tensor(tensor) => {
                    let ndim = tensor.shape.len();
                    let mut order: Vec<u32> = (0..tensor.chunks.len() as u32).collect();
                    order.sort_unstable_by_key(|&c| {
                        let at = tensor.chunks[c as usize].offsets as usize;
                        &self.dims[at..at + ndim]
                    });
                    order
                }
                Entry::NonTensor(_) => Vec::new(),
            })
            .collect();
        let mut files: HashMap<&str, u32> = HashMap::new();
        // (entry, chunk, file, storage record): a chunk's location is made
        // from its record when it is attached, not held twice.
        let mut updates: Vec<[u32; 4]> = Vec::with_capacity(pairs.len());
        for &(key, value) in pairs {
            let (Some(Folded::Index(key)), Some(Folded::Storage(value))) =
                (self.folded_as(pickle, key), self.folded_as(pickle, value))
            else {
                let (bad, part, class) = match self.folded_as(pickle, key) {
                    Some(Folded::Index(_)) => (value, "value", "filesystem._StorageInfo"),
                    _ => (key, "key", "metadata.MetadataIndex"),
                };
                return fail(format!(
                    "a storage_data {part} is a {}, not a torch.distributed.checkpoint.{class}",
                    pickle.describe(bad)
                ));
            };
            let index = &self.indices[key as usize];
            let record = &self.storages[value as usize];
            let fqn = pickle.str(Value::Node(index.fqn)).unwrap_or("");
            let Some(offsets) = index.offsets else {
                continue;
            };
            let Some(&entry) = by_name.get(fqn) else {
                continue;
            };
            let Entry::Tensor(tensor) = &metadata.entries[entry] else {
                continue;
            };
            let ndim = tensor.shape.len();
            let wanted = self.dims(offsets);
            let found = sorted[entry].binary_search_by(|&c| {
                let at = tensor.chunks[c as usize].offsets as usize;
                self.dims[at..at + ndim].cmp(wanted)
            });
            let Ok(position) = found else {
                continue;
            };
            let path = pickle.str(Value::Node(record.path)).unwrap_or("");
            let next = files.len() as u32;
            let file = *files.entry(path).or_insert(next);
            if file == next {
                metadata.files.push(path.to_owned());
            }
            updates.push([entry as u32, sorted[entry][position], file, value]);
        }
        drop(sorted);
        for [entry, chunk, file, storage] in updates {
            let record = &self.storages[storage as usize];
            let info = StorageInfo {
                file,
                transforms: record.transforms,
                offset: record.offset,
                length: record.length,
            };
            let chunk = chunk as usize;
            let Entry::Tensor(tensor) = &mut metadata.entries[entry as usize] else {
                continue;
            };
            let slot = &mut tensor.chunks[chunk].storage;
            if slot.is_some() {
                let at = tensor.chunks[chunk].offsets as usize;
                let offsets = self.dims[at..at + tensor.shape.len()].to_vec();
                return Err(MetadataError {
                    tensor: Some(tensor.name.clone()),
                    reason: format!("storage_data lists chunk {offsets:?} twice"),
                    pickle: None,
                });
            }
            *slot = Some(info);
        }
        Ok(())
    }

    /// planner_data maps each saved name to its path in the state dict
    /// given to `dcp.save`; a path of more than one element starts with the
    /// top-level key (`model`, `optimizer`). Anything else there is left
    /// alone: it is only informative.
    fn top_level_keys(
        &mut self,
        pickle: &Pickle,
        planner: Value,
        metadata: &mut Metadata,
    ) -> Parsed<()> {
        let Some(pairs) = pickle.dict(planner) else {
            return Ok(());
        };
        self.count_pairs(pairs.len())?;
        let mut keys: HashMap<&str, &str> = HashMap::with_capacity(pairs.len());
        for &(name, path) in pairs {
            let (Some(name), Some(path)) = (pickle.str(name), pickle.sequence(path)) else {
                continue;
            };
            if let [first, _, ..] = path
                && let Some(first) = pickle.str(*first)
            {
                keys.insert(name, first);
            }
        }
        for entry in &mut metadata.entries {
            if let Entry::Tensor(tensor) = entry {
                tensor.top_level_key = keys.get(tensor.name.as_str()).map(|k| (*k).to_owned());
            }
        }
        Ok(())
    }
}

/// A Python dict has unique keys; a pickle listing one twice is not DCP's.
fn check_unique_names(entries: &[Entry]) -> Parsed<()> {
    let mut seen = HashSet::with_capacity(entries.len());
    for entry in entries {
        let name = match entry {
            Entry::Tensor(tensor) => &tensor.name,
            Entry::NonTensor(name) => name,
        };
        if !seen.insert(name) {
            return Err(MetadataError {
                tensor: Some(name.clone()),
                reason: "is listed twice in state_dict_metadata".into(),
                pickle: None,
            });
        }
    }
    Ok(())
}
