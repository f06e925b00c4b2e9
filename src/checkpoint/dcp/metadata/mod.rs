//! DCP's `.metadata` pickle read straight into a compact model: what each
//! saved entry is, its chunks, and which byte range of which file holds
//! each chunk.
//!
//! The reader ([`fold`]) takes each of DCP's objects as the pickle
//! interpreter completes it, so the file is never held as a tree of values:
//! names and file paths are shared strings, offsets and sizes live in one
//! pool of integers, and a chunk costs a few dozen bytes. What the reader
//! builds is bounded by the file's size (chunks, attribute pairs), a part
//! shared through the memo is taken once, and a duplicate chunk is refused
//! when its tensor is read; [`ReadCounters`] say what a read built.

mod fold;

use super::pickle::{self, Limits, PickleError};
use crate::safetensors::dtype::Dtype;
use fold::Folder;
use std::fmt;

/// Everything this reader needs from a `.metadata` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    /// The saved entries, in the order the state dict had them.
    pub entries: Vec<Entry>,
    /// The files chunks are stored in, relative to the checkpoint
    /// directory (`StorageInfo::file` indexes them).
    pub files: Vec<String>,
    /// Stream transforms chunks were written through (`StorageInfo::transforms`
    /// indexes them; 0 is none).
    pub transforms: Vec<Vec<String>>,
    /// Every chunk's offsets and sizes (`ChunkMeta` indexes them).
    dims: Vec<u64>,
}

/// One entry of the saved state dict.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A tensor (TensorStorageMetadata).
    Tensor(TensorMeta),
    /// Any other value, saved with torch.save (BytesStorageMetadata): its name.
    NonTensor(String),
}

/// A tensor's element type as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDtype {
    /// One with a safetensors equivalent.
    Supported(Dtype),
    /// One without (complex, quantized, fnuz float8, sub-byte): its torch name.
    Unsupported(&'static str),
}

impl fmt::Display for TorchDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TorchDtype::Supported(dtype) => write!(f, "{dtype}"),
            TorchDtype::Unsupported(name) => write!(f, "torch.{name}"),
        }
    }
}

/// A tensor entry: dtype, full shape and saved chunks.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    /// The fully qualified name (the state dict key).
    pub name: String,
    /// Element type.
    pub dtype: TorchDtype,
    /// The full tensor's shape.
    pub shape: Vec<u64>,
    /// The saved pieces, each a block inside `shape` (see [`Metadata::chunk`]).
    pub chunks: Vec<ChunkMeta>,
    /// The top-level key of the state dict the entry was saved under, when
    /// `planner_data` records a path of more than one element for it:
    /// `model` for `model.lm_head.weight` saved by `dcp.save({"model": sd})`.
    pub top_level_key: Option<String>,
}

/// One saved block of a tensor, compactly: where its offsets and sizes are
/// in [`Metadata`]'s pool, and where its archive is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    offsets: u32,
    sizes: u32,
    /// Where the chunk's archive is, if `storage_data` lists it.
    pub storage: Option<StorageInfo>,
}

/// Where one chunk's torch.save archive is: `[offset, offset + length)` of
/// the file `Metadata::files[file]` in the checkpoint directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageInfo {
    /// Index into [`Metadata::files`].
    pub file: u32,
    /// Index into [`Metadata::transforms`]; 0 for plain archives.
    pub transforms: u32,
    /// First byte of the archive in that file.
    pub offset: u64,
    /// Length of the archive.
    pub length: u64,
}

/// One chunk as its reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Where the block starts in the full tensor.
    pub offsets: &'a [u64],
    /// The block's shape.
    pub sizes: &'a [u64],
}

impl Metadata {
    /// The offsets and sizes of `chunk`, a chunk of `tensor`.
    pub fn chunk<'a>(&'a self, tensor: &TensorMeta, chunk: &ChunkMeta) -> Chunk<'a> {
        let ndim = tensor.shape.len();
        let at = |start: u32| &self.dims[start as usize..start as usize + ndim];
        Chunk {
            offsets: at(chunk.offsets),
            sizes: at(chunk.sizes),
        }
    }

    /// The tensor entries.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorMeta> {
        self.entries.iter().filter_map(|entry| match entry {
            Entry::Tensor(tensor) => Some(tensor),
            Entry::NonTensor(_) => None,
        })
    }
}

/// What reading a `.metadata` built, counted by the interpreter and the
/// reader: the tests assert on these rather than on time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounters {
    /// The file's size in bytes.
    pub input: usize,
    /// Values the interpreter built.
    pub values: u64,
    /// Bytes charged for them.
    pub bytes: usize,
    /// Objects taken into the model as they were completed.
    pub folded: u64,
    /// Chunks built into the model (every tensor's, summed).
    pub pieces: u64,
    /// Attribute-dictionary pairs looked at.
    pub attribute_pairs: u64,
    /// The most values alive in the interpreter at once (its arena's slots).
    pub arena_slots: usize,
    /// Memo entries the interpreter kept, because the pickle fetches them.
    pub memo_kept: usize,
    /// Memo entries the pickle stored.
    pub memo_defined: usize,
}

/// Why a `.metadata` file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataError {
    /// The entry concerned, if the problem is in one entry.
    pub tensor: Option<String>,
    /// What is wrong.
    pub reason: String,
    /// The interpreter's refusal, when the pickle itself was refused
    /// (a forbidden global, truncation, a limit).
    pub pickle: Option<PickleError>,
}

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(tensor) => write!(f, "entry '{tensor}': {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for MetadataError {}

type Parsed<T> = Result<T, MetadataError>;

fn fail<T>(reason: impl Into<String>) -> Parsed<T> {
    Err(MetadataError {
        tensor: None,
        reason: reason.into(),
        pickle: None,
    })
}

fn in_entry(name: &str) -> impl Fn(MetadataError) -> MetadataError + '_ {
    move |err| MetadataError {
        tensor: err.tensor.or_else(|| Some(name.to_owned())),
        ..err
    }
}

const DCP_METADATA: &str = "torch.distributed.checkpoint.metadata";

/// Parses the bytes of a `.metadata` file.
pub fn parse_metadata(bytes: &[u8]) -> Parsed<Metadata> {
    parse_metadata_counted(bytes).0
}

/// Parses the bytes of a `.metadata` file, and says what it built, also
/// when it refused them.
pub fn parse_metadata_counted(bytes: &[u8]) -> (Parsed<Metadata>, ReadCounters) {
    parse_metadata_from(&mut std::io::Cursor::new(bytes), bytes.len())
}

/// [`parse_metadata_counted`] of the `len` bytes `reader` holds, read
/// through a small window rather than held whole.
pub fn parse_metadata_from<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    len: usize,
) -> (Parsed<Metadata>, ReadCounters) {
    let mut folder = Folder::new(len);
    let (parsed, machine) =
        pickle::parse_folding_from(reader, len, &Limits::METADATA, Some(&mut folder));
    let result = match parsed {
        Ok(pickle) => folder.finish(&pickle),
        Err(err) if err.kind == pickle::PickleErrorKind::Refused => Err(folder.take_error()),
        Err(err) => Err(MetadataError {
            tensor: None,
            reason: err.to_string(),
            pickle: Some(err),
        }),
    };
    let counters = ReadCounters {
        input: len,
        values: machine.values,
        bytes: machine.bytes,
        folded: machine.folded,
        pieces: folder.pieces,
        attribute_pairs: folder.attribute_pairs,
        arena_slots: machine.arena_slots,
        memo_kept: machine.memo_kept,
        memo_defined: machine.memo_defined,
    };
    (result, counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol-2 pickle pieces, as Python's pickler writes them.
    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    fn text(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn size(dims: &[u8]) -> Vec<u8> {
        let mut out = global("torch", "Size");
        out.push(b'(');
        for d in dims {
            out.extend_from_slice(&[b'K', *d]);
        }
        out.extend_from_slice(b"t\x85R");
        out
    }

    fn dataclass(class: &str, fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = global(DCP_METADATA, class);
        out.extend_from_slice(b")\x81}(");
        for (key, value) in fields {
            out.extend(text(key));
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"ub");
        out
    }

    /// A Metadata with one tensor `w` of `dtype`, shape [4], one chunk at
    /// `chunk_at` of size `chunk_len`, stored in `__0_0.distcp` at [0, 100).
    fn metadata(dtype: &str, chunk_at: u8, chunk_len: u8, transforms: &[&str]) -> Vec<u8> {
        let mut properties = global(DCP_METADATA, "TensorProperties");
        properties.extend_from_slice(b")\x81(");
        properties.extend(global("torch", dtype));
        properties.extend_from_slice(b"N\x89N\x89tb");
        let chunk = dataclass(
            "ChunkStorageMetadata",
            &[
                ("offsets", size(&[chunk_at])),
                ("sizes", size(&[chunk_len])),
            ],
        );
        let mut chunks = b"](".to_vec();
        chunks.extend(chunk);
        chunks.push(b'e');
        let tensor = dataclass(
            "TensorStorageMetadata",
            &[
                ("properties", properties),
                ("size", size(&[4])),
                ("chunks", chunks),
            ],
        );
        let mut state_dict = b"}(".to_vec();
        state_dict.extend(text("w"));
        state_dict.extend(tensor);
        state_dict.extend(text("step"));
        state_dict.extend(dataclass("BytesStorageMetadata", &[]));
        state_dict.push(b'u');
        let index = dataclass(
            "MetadataIndex",
            &[
                ("fqn", text("w")),
                ("offset", size(&[chunk_at])),
                ("index", b"K\x00".to_vec()),
            ],
        );
        let mut descriptors = b"](".to_vec();
        for t in transforms {
            descriptors.extend(text(t));
        }
        descriptors.push(b'e');
        let mut info = global("torch.distributed.checkpoint.filesystem", "_StorageInfo");
        info.extend_from_slice(b")\x81}(");
        info.extend(text("relative_path"));
        info.extend(text("__0_0.distcp"));
        info.extend(text("offset"));
        info.extend_from_slice(b"K\x00");
        info.extend(text("length"));
        info.extend_from_slice(b"Kd");
        if !transforms.is_empty() {
            info.extend(text("transform_descriptors"));
            info.extend(descriptors);
        }
        info.extend_from_slice(b"ub");
        let mut storage = b"}(".to_vec();
        storage.extend(index);
        storage.extend(info);
        storage.push(b'u');
        let mut out = b"\x80\x02".to_vec();
        out.extend(dataclass(
            "Metadata",
            &[
                ("state_dict_metadata", state_dict),
                ("storage_data", storage),
            ],
        ));
        out.push(b'.');
        out
    }

    #[test]
    fn a_hand_written_metadata_reads_back() {
        let meta = parse_metadata(&metadata("bfloat16", 0, 4, &[])).unwrap();
        assert_eq!(meta.entries.len(), 2);
        assert_eq!(meta.entries[1], Entry::NonTensor("step".into()));
        let Entry::Tensor(tensor) = &meta.entries[0] else {
            panic!("not a tensor");
        };
        assert_eq!(
            (tensor.name.as_str(), tensor.dtype, tensor.shape.as_slice()),
            ("w", TorchDtype::Supported(Dtype::BF16), &[4][..])
        );
        assert_eq!(tensor.top_level_key, None);
        let [chunk] = tensor.chunks.as_slice() else {
            panic!("one chunk");
        };
        let view = meta.chunk(tensor, chunk);
        assert_eq!((view.offsets, view.sizes), (&[0][..], &[4][..]));
        let info = chunk.storage.unwrap();
        assert_eq!(
            (
                meta.files[info.file as usize].as_str(),
                info.offset,
                info.length
            ),
            ("__0_0.distcp", 0, 100)
        );
        assert!(meta.transforms[info.transforms as usize].is_empty());
    }

    #[test]
    fn transforms_and_unsupported_dtypes_are_reported() {
        let meta = parse_metadata(&metadata("complex128", 0, 4, &["stream.zstd/1"])).unwrap();
        let Entry::Tensor(tensor) = &meta.entries[0] else {
            panic!("not a tensor");
        };
        assert_eq!(tensor.dtype, TorchDtype::Unsupported("complex128"));
        assert_eq!(tensor.dtype.to_string(), "torch.complex128");
        let info = tensor.chunks[0].storage.unwrap();
        assert_eq!(meta.transforms[info.transforms as usize], ["stream.zstd/1"]);
    }

    #[test]
    fn a_chunk_outside_the_tensor_is_refused_naming_it() {
        let err = parse_metadata(&metadata("float32", 2, 3, &[])).unwrap_err();
        assert_eq!(err.tensor.as_deref(), Some("w"));
        assert!(err.reason.contains("outside the full shape [4]"), "{err}");
    }

    #[test]
    fn an_entry_listed_twice_is_refused() {
        let mut bytes = metadata("float32", 0, 4, &[]);
        // Rename "step" to "w" (same length prefix patched: both are X-strings).
        let at = bytes
            .windows(9)
            .position(|w| w == b"X\x04\x00\x00\x00step")
            .unwrap();
        bytes.splice(at..at + 9, *b"X\x01\x00\x00\x00w");
        let err = parse_metadata(&bytes).unwrap_err();
        assert_eq!(err.tensor.as_deref(), Some("w"));
        assert!(err.reason.contains("listed twice"), "{err}");
    }

    #[test]
    fn a_non_metadata_pickle_is_refused() {
        let err = parse_metadata(b"\x80\x02}.").unwrap_err();
        assert!(
            err.reason
                .contains("not a torch.distributed.checkpoint.metadata.Metadata")
        );
        let err = parse_metadata(b"cos\nsystem\n.").unwrap_err();
        assert!(err.reason.contains("os.system"), "{err}");
    }
}
