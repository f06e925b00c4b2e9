//! Reading a chunk archive's `data.pkl` (the tensor rebuild call) and
//! checking the storage it describes against `.metadata`'s chunk.

use super::{CORRUPT, ChunkRequest, MISMATCH, RESAVE, Refusal, refuse};
use crate::checkpoint::dcp::pickle::{self, Limits, Node, Value};
use crate::checkpoint::dcp::torch_types::{torch_dtype, typed_storage_dtype};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{byte_len, element_count};

/// What data.pkl says about the tensor's storage.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Storage {
    /// The torch dtype name of the tensor's elements.
    dtype: &'static str,
    /// Bytes the storage holds (element count × element size for typed
    /// storages, the byte count for untyped ones).
    bytes: Option<u64>,
    /// The storage's key: its bytes are entry `data/<key>`.
    pub(super) key: String,
    storage_offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// Interprets `_rebuild_tensor_v2(storage, offset, size, stride, ...)` or
/// `_rebuild_tensor_v3(..., dtype)`, with `storage` a persistent id
/// `('storage', StorageClass, key, location, numel)`.
pub(super) fn read_rebuild(bytes: &[u8], range: &str) -> Result<Storage, Refusal> {
    let bad = |reason: String| Refusal {
        reason: format!("data.pkl of the chunk at {range}: {reason}"),
        hint: CORRUPT,
    };
    let pickle = pickle::parse(bytes, &Limits::DATA_PKL).map_err(|err| bad(err.to_string()))?;
    let root = pickle.root();
    let Some(call) = pickle.object(root) else {
        return Err(bad(format!(
            "holds a {}, not a tensor",
            pickle.describe(root)
        )));
    };
    let v3 = call.class.is("torch._utils", "_rebuild_tensor_v3");
    if !v3 && !call.class.is("torch._utils", "_rebuild_tensor_v2") {
        return Err(bad(format!(
            "rebuilds with {}, not _rebuild_tensor_v2/_v3",
            call.class
        )));
    }
    let args = pickle.tuple(call.args).unwrap_or_default();
    if args.len() < if v3 { 7 } else { 6 } {
        return Err(bad(format!(
            "{} has only {} arguments",
            call.class,
            args.len()
        )));
    }
    let pid = match pickle.node(args[0]) {
        Some(Node::PersistentId(pid)) => pickle.tuple(*pid).unwrap_or_default(),
        _ => return Err(bad("the storage is not a persistent id".into())),
    };
    let [kind, class, key, _location, numel] = pid else {
        return Err(bad(format!(
            "the storage id has {} items, not 5",
            pid.len()
        )));
    };
    let class = pickle
        .global(*class)
        .filter(|_| pickle.str(*kind) == Some("storage"));
    let (Some(class), Some(key), Value::Int(numel)) = (class, pickle.str(*key), *numel) else {
        return Err(bad(
            "the storage id is not ('storage', class, key, location, size)".into(),
        ));
    };
    let typed = typed_storage_dtype(class.name).filter(|_| class.module == "torch");
    let dtype = match (typed, v3) {
        (Some(dtype), _) => dtype,
        (None, true) if class.name == "UntypedStorage" => {
            let dtype = pickle.global(args[6]).filter(|g| g.module == "torch");
            match dtype.filter(|g| torch_dtype(g.name).is_some()) {
                Some(global) => global.name,
                None => return Err(bad(format!("dtype is a {}", pickle.describe(args[6])))),
            }
        }
        _ => {
            return Err(bad(format!(
                "storage class {class} does not say the element type"
            )));
        }
    };
    let element_size = torch_dtype(dtype).flatten().map(Dtype::size);
    let numel = u64::try_from(numel).map_err(|_| bad("negative storage size".into()))?;
    let bytes = match typed {
        Some(_) => element_size.and_then(|size| numel.checked_mul(size)),
        None => Some(numel),
    };
    let ints = |value: Value, what: &str| -> Result<Vec<i64>, Refusal> {
        let items = pickle
            .sequence(value)
            .ok_or_else(|| bad(format!("{what} is not a tuple")))?;
        items
            .iter()
            .map(|item| match item {
                Value::Int(n) => Ok(*n),
                _ => Err(bad(format!("{what} holds a non-integer"))),
            })
            .collect()
    };
    let Value::Int(storage_offset) = args[1] else {
        return Err(bad("the storage offset is not an integer".into()));
    };
    Ok(Storage {
        dtype,
        bytes,
        key: key.to_owned(),
        storage_offset,
        size: ints(args[2], "the size")?,
        stride: ints(args[3], "the stride")?,
    })
}

/// Checks data.pkl's tensor against `.metadata`'s chunk.
pub(super) fn check_storage(
    storage: &Storage,
    chunk: &ChunkRequest,
    range: &str,
) -> Result<(), Refusal> {
    let saved_dtype = torch_dtype(storage.dtype).flatten();
    if saved_dtype != Some(chunk.dtype) {
        return refuse(
            format!(
                "the chunk at {range} holds torch.{} elements, .metadata says {}",
                storage.dtype, chunk.dtype
            ),
            MISMATCH,
        );
    }
    let sizes: Vec<i64> = chunk.sizes.iter().map(|&d| d as i64).collect();
    if storage.size != sizes || chunk.sizes.iter().any(|&d| d > i64::MAX as u64) {
        return refuse(
            format!(
                "the chunk at {range} has shape {:?}, .metadata says {:?}",
                storage.size, chunk.sizes
            ),
            MISMATCH,
        );
    }
    let count = element_count(chunk.sizes).unwrap_or(u64::MAX);
    if count > 0 && !is_contiguous(&storage.size, &storage.stride) {
        return refuse(
            format!(
                "the chunk at {range} was saved non-contiguous (stride {:?} for shape {:?}); its bytes are not row-major",
                storage.stride, storage.size
            ),
            "save contiguous tensors: call .contiguous() on the state dict's values before dcp.save",
        );
    }
    if storage.storage_offset != 0 {
        return refuse(
            format!(
                "the chunk at {range} starts at element {} of its storage, not 0",
                storage.storage_offset
            ),
            "save contiguous tensors: call .contiguous() on the state dict's values before dcp.save",
        );
    }
    let needed = byte_len(chunk.sizes, chunk.dtype);
    if storage.bytes != needed {
        return refuse(
            format!(
                "the chunk at {range} has a storage of {} bytes, its {count} elements need {}",
                storage.bytes.map_or("too many".into(), |b| b.to_string()),
                needed.map_or("too many".into(), |b| b.to_string()),
            ),
            RESAVE,
        );
    }
    Ok(())
}

/// Row-major contiguity as PyTorch defines it: strides of size-1 dimensions
/// do not matter.
fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
    if size.len() != stride.len() {
        return false;
    }
    let mut expected: i64 = 1;
    for (&dim, &step) in size.iter().zip(stride).rev() {
        if dim != 1 && step != expected {
            return false;
        }
        expected = match expected.checked_mul(dim) {
            Some(next) => next,
            None => return false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_follows_pytorch() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 4], &[1, 3]));
        // Size-1 dimensions may carry any stride.
        assert!(is_contiguous(&[1, 64], &[128, 1]));
        assert!(is_contiguous(&[4, 1], &[1, 7]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[2], &[2]));
        assert!(!is_contiguous(&[2, 2], &[2]));
    }

    fn bf16_2x3() -> Storage {
        Storage {
            dtype: "bfloat16",
            bytes: Some(12),
            key: "0".into(),
            storage_offset: 0,
            size: vec![2, 3],
            stride: vec![3, 1],
        }
    }

    const CHUNK: ChunkRequest = ChunkRequest {
        dtype: Dtype::BF16,
        sizes: &[2, 3],
        offset: 0,
        length: 0,
    };

    fn refusal(storage: Storage) -> String {
        check_storage(&storage, &CHUNK, "r").unwrap_err().reason
    }

    #[test]
    fn data_pkl_must_describe_exactly_the_chunk() {
        assert_eq!(check_storage(&bf16_2x3(), &CHUNK, "r"), Ok(()));
        let shape = refusal(Storage {
            size: vec![3, 2],
            stride: vec![2, 1],
            ..bf16_2x3()
        });
        assert!(
            shape.contains("shape [3, 2], .metadata says [2, 3]"),
            "{shape}"
        );
        let dtype = refusal(Storage {
            dtype: "float16",
            ..bf16_2x3()
        });
        assert!(
            dtype.contains("torch.float16 elements, .metadata says BF16"),
            "{dtype}"
        );
        let strided = refusal(Storage {
            stride: vec![1, 2],
            ..bf16_2x3()
        });
        assert!(strided.contains("non-contiguous"), "{strided}");
        let offset = refusal(Storage {
            storage_offset: 3,
            ..bf16_2x3()
        });
        assert!(offset.contains("starts at element 3"), "{offset}");
        // A view's whole base storage saved along with it.
        let bigger = refusal(Storage {
            bytes: Some(24),
            ..bf16_2x3()
        });
        assert!(bigger.contains("storage of 24 bytes"), "{bigger}");
    }

    #[test]
    fn a_rebuild_of_a_forbidden_function_is_refused() {
        let err = read_rebuild(
            b"\x80\x02ctorch._utils\n_rebuild_parameter\n.",
            "bytes [0, 9)",
        )
        .unwrap_err();
        assert!(
            err.reason.contains("torch._utils._rebuild_parameter"),
            "{err:?}"
        );
        assert!(err.reason.contains("bytes [0, 9)"), "{err:?}");
    }

    #[test]
    fn the_torch_2_15_bf16_rebuild_is_understood() {
        // data.pkl of model.embed_tokens.weight's first chunk in the w2 fixture.
        let pkl =
            b"\x80\x02ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x00((X\x07\x00\x00\x00storageq\x01\
ctorch\x0aBFloat16Storage\x0aq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04M@}tq\x05QK\x00\
M\xf5\x01K@\x86q\x06K@K\x01\x86q\x07\x89ccollections\x0aOrderedDict\x0aq\x08)Rq\x09tq\x0aRq\x0b.";
        let storage = read_rebuild(pkl, "r").unwrap();
        assert_eq!(
            storage,
            Storage {
                dtype: "bfloat16",
                bytes: Some(32064 * 2),
                key: "0".into(),
                storage_offset: 0,
                size: vec![501, 64],
                stride: vec![64, 1],
            }
        );
    }
}
