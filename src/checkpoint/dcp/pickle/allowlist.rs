//! The globals a checkpoint pickle may name: DCP's metadata classes, torch
//! dtypes, storages, layouts and memory formats, tensor rebuild functions,
//! and the DeepSpeed classes its checkpoints pickle (the stage enum, loss
//! scalers, fragment addresses). Each is only ever recorded, never called.

use super::Global;
use crate::checkpoint::dcp::torch_types::{LAYOUTS, MEMORY_FORMATS, TORCH_DTYPES, TYPED_STORAGES};

/// Modules whose listed names are allowed, besides torch's dtypes, storages,
/// layouts and memory formats (see [`allowed_global`]).
const FIXED_GLOBALS: &[(&str, &[&str])] = &[
    (
        "torch.distributed.checkpoint.metadata",
        &[
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        ],
    ),
    // Where TensorProperties and its enum lived before PyTorch 2.1.
    (
        "torch.distributed._shard.sharded_tensor.metadata",
        &[
            "TensorProperties",
            "MEM_FORMAT_ENCODING",
            "_MEM_FORMAT_ENCODING",
        ],
    ),
    ("torch.distributed.checkpoint.filesystem", &["_StorageInfo"]),
    ("torch", &["Size", "UntypedStorage"]),
    ("torch.storage", &["UntypedStorage"]),
    ("torch.serialization", &["_get_layout"]),
    (
        "torch._utils",
        &["_rebuild_tensor_v2", "_rebuild_tensor_v3"],
    ),
    // ZeRO-3's flat groups carry a `ds_id` attribute through this.
    ("torch._tensor", &["_rebuild_from_type_v2"]),
    ("torch", &["Tensor"]),
    // DeepSpeed's checkpoints (the format brief's §2.4).
    ("deepspeed.runtime.zero.config", &["ZeroStageEnum"]),
    (
        "deepspeed.runtime.fp16.loss_scaler",
        &["LossScaler", "DynamicLossScaler"],
    ),
    ("deepspeed.utils.tensor_fragment", &["fragment_address"]),
    // What training scripts put in DeepSpeed's client state beside the
    // weights: Megatron-DeepSpeed's arguments, numpy numbers and RNG
    // states (numpy 2 moved `numpy.core` to `numpy._core`).
    ("argparse", &["Namespace"]),
    ("numpy", &["dtype", "ndarray"]),
    ("numpy.core.multiarray", &["scalar", "_reconstruct"]),
    ("numpy._core.multiarray", &["scalar", "_reconstruct"]),
    ("_codecs", &["encode"]),
    ("collections", &["OrderedDict"]),
    // StorageMeta.checkpoint_id may be a path; Python 3.13 moved the classes
    // to pathlib._local.
    (
        "pathlib",
        &[
            "Path",
            "PosixPath",
            "WindowsPath",
            "PurePath",
            "PurePosixPath",
            "PureWindowsPath",
        ],
    ),
    (
        "pathlib._local",
        &[
            "Path",
            "PosixPath",
            "WindowsPath",
            "PurePath",
            "PurePosixPath",
            "PureWindowsPath",
        ],
    ),
];

/// The allowlist: `Some` for a global a DCP pickle may name.
pub fn allowed_global(module: &str, name: &str) -> Option<Global> {
    for (allowed_module, names) in FIXED_GLOBALS {
        if *allowed_module != module {
            continue;
        }
        if let Some(allowed) = names.iter().find(|n| **n == name) {
            return Some(Global {
                module: allowed_module,
                name: allowed,
            });
        }
    }
    if module != "torch" {
        return None;
    }
    TORCH_DTYPES
        .iter()
        .map(|(n, _)| *n)
        .chain(TYPED_STORAGES.iter().map(|(n, _)| *n))
        .chain(LAYOUTS.iter().copied())
        .chain(MEMORY_FORMATS.iter().copied())
        .find(|n| *n == name)
        .map(|name| Global {
            module: "torch",
            name,
        })
}

/// Every allowed global, for documentation and tests.
pub fn allowlist() -> Vec<Global> {
    let mut all: Vec<Global> = FIXED_GLOBALS
        .iter()
        .flat_map(|(module, names)| names.iter().map(move |name| Global { module, name }))
        .collect();
    let torch_names = TORCH_DTYPES
        .iter()
        .map(|(n, _)| *n)
        .chain(TYPED_STORAGES.iter().map(|(n, _)| *n))
        .chain(LAYOUTS.iter().copied())
        .chain(MEMORY_FORMATS.iter().copied());
    all.extend(torch_names.map(|name| Global {
        module: "torch",
        name,
    }));
    all
}
