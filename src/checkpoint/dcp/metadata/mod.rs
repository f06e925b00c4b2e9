//! DCP's `.metadata` pickle as plain Rust values: what each saved entry is,
//! its chunks, and which byte range of which file holds each chunk.

mod reader;

use super::pickle::{self, Limits, Pickle};
use crate::safetensors::dtype::Dtype;
use reader::Reader;
use std::collections::HashMap;
use std::fmt;

/// Everything this reader needs from a `.metadata` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    /// The saved entries, in the order the state dict had them.
    pub entries: Vec<Entry>,
    /// Where each tensor chunk is stored, by (tensor name, chunk offsets).
    pub storage: HashMap<(String, Vec<u64>), StorageInfo>,
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
    /// The saved pieces, each a block inside `shape`.
    pub chunks: Vec<Chunk>,
}

/// One saved block of a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where the block starts in the full tensor.
    pub offsets: Vec<u64>,
    /// The block's shape.
    pub sizes: Vec<u64>,
}

/// Where one chunk's torch.save archive is: `[offset, offset + length)` of
/// the file `relative_path` in the checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageInfo {
    /// The `.distcp` file, relative to the checkpoint directory.
    pub relative_path: String,
    /// First byte of the archive in that file.
    pub offset: u64,
    /// Length of the archive.
    pub length: u64,
    /// Stream transforms applied when writing (e.g. `stream.zstd/1`); empty
    /// for plain archives.
    pub transforms: Vec<String>,
}

/// Why a `.metadata` file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataError {
    /// The entry concerned, if the problem is in one entry.
    pub tensor: Option<String>,
    /// What is wrong.
    pub reason: String,
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
    })
}

fn in_entry(name: &str) -> impl Fn(MetadataError) -> MetadataError + '_ {
    move |err| MetadataError {
        tensor: err.tensor.or_else(|| Some(name.to_owned())),
        reason: err.reason,
    }
}

const DCP_METADATA: &str = "torch.distributed.checkpoint.metadata";

/// Parses the bytes of a `.metadata` file.
pub fn parse_metadata(bytes: &[u8]) -> Parsed<Metadata> {
    let pickle = pickle::parse(bytes, &Limits::METADATA).map_err(|err| MetadataError {
        tensor: None,
        reason: err.to_string(),
    })?;
    from_pickle(&pickle)
}

/// Reads DCP metadata from an already parsed pickle.
pub fn from_pickle(pickle: &Pickle) -> Parsed<Metadata> {
    let reader = Reader { pickle };
    let root = reader.object_of(pickle.root(), DCP_METADATA, "Metadata", "the pickle")?;
    let fields = reader.fields(root, "Metadata")?;
    let Some(state_dict) = reader.field(fields, "state_dict_metadata") else {
        return fail("Metadata has no state_dict_metadata");
    };
    let Some(entries) = pickle.dict(state_dict) else {
        return fail(format!(
            "state_dict_metadata is a {}, not a dict",
            pickle.describe(state_dict)
        ));
    };
    let entries = entries
        .iter()
        .map(|&(key, value)| reader.entry(key, value))
        .collect::<Parsed<Vec<_>>>()?;
    check_unique_names(&entries)?;
    let storage = match reader.field(fields, "storage_data") {
        Some(storage) => reader.storage_data(storage)?,
        None => return fail("Metadata has no storage_data"),
    };
    Ok(Metadata { entries, storage })
}

/// A Python dict has unique keys; a pickle listing one twice is not DCP's.
fn check_unique_names(entries: &[Entry]) -> Parsed<()> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for entry in entries {
        let name = match entry {
            Entry::Tensor(tensor) => &tensor.name,
            Entry::NonTensor(name) => name,
        };
        if !seen.insert(name) {
            return Err(MetadataError {
                tensor: Some(name.clone()),
                reason: "is listed twice in state_dict_metadata".into(),
            });
        }
    }
    Ok(())
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
        assert_eq!(
            meta.entries,
            vec![
                Entry::Tensor(TensorMeta {
                    name: "w".into(),
                    dtype: TorchDtype::Supported(Dtype::BF16),
                    shape: vec![4],
                    chunks: vec![Chunk {
                        offsets: vec![0],
                        sizes: vec![4]
                    }],
                }),
                Entry::NonTensor("step".into()),
            ]
        );
        let info = &meta.storage[&("w".to_owned(), vec![0])];
        assert_eq!(
            (info.relative_path.as_str(), info.offset, info.length),
            ("__0_0.distcp", 0, 100)
        );
        assert!(info.transforms.is_empty());
    }

    #[test]
    fn transforms_and_unsupported_dtypes_are_reported() {
        let meta = parse_metadata(&metadata("complex128", 0, 4, &["stream.zstd/1"])).unwrap();
        let Entry::Tensor(tensor) = &meta.entries[0] else {
            panic!("not a tensor");
        };
        assert_eq!(tensor.dtype, TorchDtype::Unsupported("complex128"));
        assert_eq!(tensor.dtype.to_string(), "torch.complex128");
        let info = &meta.storage[&("w".to_owned(), vec![0])];
        assert_eq!(info.transforms, vec!["stream.zstd/1".to_owned()]);
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
