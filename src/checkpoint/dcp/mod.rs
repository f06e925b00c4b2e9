//! Reading PyTorch DCP's default on-disk format (`FileSystemWriter`) without
//! Python: the `.metadata` pickle and the `__R_I.distcp` files.
//!
//! [`pickle`] builds values from a pickle without running anything;
//! [`metadata`] turns `.metadata` into tensors, chunks and byte ranges;
//! [`archive`] finds each chunk's bytes inside its torch.save zip and checks
//! them against the metadata. [`read_dcp_checkpoint`] does all three and
//! returns, for every tensor, where each piece's raw row-major bytes are.

pub mod archive;
pub mod metadata;
pub mod pickle;
pub mod torch_types;

use crate::checkpoint::coverage::{CoverageFault, check_coverage, region};
use crate::checkpoint::select::Selection;
use crate::checkpoint::{Checkpoint, FullTensor, Location, Piece};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::byte_len;
use archive::{ChunkRequest, locate_chunk_data};
use metadata::{Entry, Metadata, MetadataError, TensorMeta, TorchDtype};
use pickle::{Limits, PickleErrorKind};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The metadata file's name inside a DCP checkpoint directory.
pub const METADATA_FILE: &str = ".metadata";

/// A DCP checkpoint directory, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcpCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The tensors, in the order of the saved state dict, each with pieces
    /// located and verified against their archives.
    pub tensors: Vec<DcpTensor>,
    /// Entries that are not tensors (ints, dicts, ... saved with torch.save).
    pub non_tensors: Vec<String>,
    /// Tensors kept by the filter whose dtype has no safetensors equivalent
    /// (complex, quantized, ...); their chunks were not read. The caller
    /// decides whether that is an error ([`UnsupportedTensor::error`]).
    pub unsupported: Vec<UnsupportedTensor>,
    /// Tensors the filter left out; their chunks were not read.
    pub skipped: Vec<String>,
    /// The same, with each one's bytes (for the dry-run table).
    pub excluded: Vec<(String, u64)>,
}

/// A tensor and where its pieces are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcpTensor {
    /// The fully qualified name, as saved.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// The full shape.
    pub shape: Vec<u64>,
    /// Pieces that tile the full shape exactly (checked).
    pub pieces: Vec<DcpPiece>,
}

/// One saved piece: a dense row-major block of the full tensor, stored
/// contiguously in a `.distcp` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcpPiece {
    /// The `.distcp` file, relative to the checkpoint directory.
    pub file: String,
    /// Absolute offset of the piece's first byte in that file.
    pub data_offset: u64,
    /// Where the piece starts in the full tensor.
    pub offsets: Vec<u64>,
    /// The piece's shape.
    pub shape: Vec<u64>,
}

/// A tensor whose dtype cannot be written to safetensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedTensor {
    /// The tensor's name.
    pub name: String,
    /// Its torch dtype, e.g. `complex64`.
    pub torch_dtype: &'static str,
}

impl UnsupportedTensor {
    /// The error to report when this tensor was asked for.
    pub fn error(&self, dir: &Path) -> Error {
        Error::BadTensor {
            path: dir.join(METADATA_FILE),
            tensor: self.name.clone(),
            reason: format!(
                "its dtype torch.{} has no safetensors equivalent",
                self.torch_dtype
            ),
            hint: "leave this tensor out of the export, or convert it to a supported dtype in PyTorch and re-save",
        }
    }
}

impl DcpCheckpoint {
    /// The distinct `.distcp` files the pieces use, as full paths, and the
    /// tensors in the form the rest of the program consolidates (a piece's
    /// `Location::shard` indexes the returned paths).
    pub fn to_full_tensors(&self) -> (Vec<PathBuf>, Vec<FullTensor>) {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let tensors = self
            .tensors
            .iter()
            .map(|tensor| FullTensor {
                name: tensor.name.clone(),
                dtype: tensor.dtype,
                shape: tensor.shape.clone(),
                pieces: tensor
                    .pieces
                    .iter()
                    .map(|piece| {
                        let shard = *index.entry(&piece.file).or_insert_with(|| {
                            files.push(self.dir.join(&piece.file));
                            files.len() - 1
                        });
                        let location = Location {
                            shard,
                            offset: piece.data_offset,
                        };
                        Piece::new(location, &piece.offsets, &piece.shape)
                    })
                    .collect(),
            })
            .collect();
        (files, tensors)
    }
}

/// Reads a DCP checkpoint into the checkpoint model every format shares:
/// the tensors `select` keeps, located and checked; the names of non-tensor
/// entries; and the tensors left out, with their bytes. A kept tensor of a
/// dtype safetensors cannot hold is an error naming it.
pub fn read_checkpoint(dir: &Path, select: &Selection) -> Result<Checkpoint> {
    let dcp = read_dcp_checkpoint_with(dir, &|name| select.keeps(name))?;
    if let Some(unsupported) = dcp.unsupported.first() {
        return Err(unsupported.error(dir));
    }
    let (files, mut tensors) = dcp.to_full_tensors();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Checkpoint {
        files,
        tensors,
        skipped_outputs: Vec::new(),
        non_tensors: dcp.non_tensors,
        excluded: dcp.excluded,
    })
}

/// Whether `dir` looks like a DCP FileSystemWriter checkpoint.
pub fn is_dcp_checkpoint(dir: &Path) -> bool {
    dir.join(METADATA_FILE).is_file()
}

/// Reads a DCP checkpoint directory: every tensor, located and checked.
pub fn read_dcp_checkpoint(dir: &Path) -> Result<DcpCheckpoint> {
    read_dcp_checkpoint_with(dir, &|_| true)
}

/// Reads a DCP checkpoint directory, locating only the tensors `keep`
/// accepts (reading a chunk's archive costs a few small reads, so leaving
/// out optimizer state saves most of them).
pub fn read_dcp_checkpoint_with(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<DcpCheckpoint> {
    let metadata_path = dir.join(METADATA_FILE);
    let metadata = read_metadata_file(&metadata_path)?;
    let mut checkpoint = DcpCheckpoint {
        dir: dir.to_owned(),
        tensors: Vec::new(),
        non_tensors: Vec::new(),
        unsupported: Vec::new(),
        skipped: Vec::new(),
        excluded: Vec::new(),
    };
    let mut files = OpenFiles::default();
    for entry in &metadata.entries {
        let tensor = match entry {
            Entry::NonTensor(name) => {
                checkpoint.non_tensors.push(name.clone());
                continue;
            }
            Entry::Tensor(tensor) => tensor,
        };
        if !keep(&tensor.name) {
            let bytes = match tensor.dtype {
                TorchDtype::Supported(dtype) => byte_len(&tensor.shape, dtype).unwrap_or(0),
                TorchDtype::Unsupported(_) => 0,
            };
            checkpoint.excluded.push((tensor.name.clone(), bytes));
            checkpoint.skipped.push(tensor.name.clone());
            continue;
        }
        let dtype = match tensor.dtype {
            TorchDtype::Supported(dtype) => dtype,
            TorchDtype::Unsupported(torch_dtype) => {
                checkpoint.unsupported.push(UnsupportedTensor {
                    name: tensor.name.clone(),
                    torch_dtype,
                });
                continue;
            }
        };
        let located = locate_tensor(dir, &metadata, tensor, dtype, &mut files)?;
        checkpoint.tensors.push(located);
    }
    Ok(checkpoint)
}

/// Reads and parses a `.metadata` file.
pub fn read_metadata_file(path: &Path) -> Result<Metadata> {
    let bytes = read_capped(path, Limits::METADATA.max_input as u64)?;
    let parsed = pickle::parse(&bytes, &Limits::METADATA).map_err(|err| {
        let hint = match err.kind {
            PickleErrorKind::ForbiddenGlobal(_) => {
                "either a newer PyTorch saved a class this program does not know yet (report its name so it can be reviewed and allowed), or the file was made to run code: do not load it in Python before checking where it came from"
            }
            _ => {
                "the file is truncated or corrupt, or not a DCP checkpoint's .metadata; copy it again or re-save the checkpoint"
            }
        };
        bad_metadata(path, err.to_string(), hint)
    })?;
    metadata::from_pickle(&parsed).map_err(|err| metadata_error(path, err))
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("inspect", path, e))?
        .len();
    if len > max {
        return Err(bad_metadata(
            path,
            format!("{len} bytes is more than the {max} a DCP .metadata file is expected to hold"),
            "check that this is a DCP checkpoint's .metadata",
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(bytes)
}

/// A `.metadata` file that cannot be used.
fn bad_metadata(path: &Path, reason: String, hint: &str) -> Error {
    Error::BadCheckpoint {
        path: path.to_owned(),
        reason: format!("not a usable DCP checkpoint metadata file: {reason}"),
        hint: hint.to_owned(),
    }
}

fn metadata_error(path: &Path, err: MetadataError) -> Error {
    const HINT: &str = "the checkpoint's .metadata is inconsistent or from an unknown PyTorch version; re-save the checkpoint";
    match err.tensor {
        Some(tensor) => Error::BadTensor {
            path: path.to_owned(),
            tensor,
            reason: err.reason,
            hint: HINT,
        },
        None => bad_metadata(path, err.reason, HINT),
    }
}

/// `.distcp` files opened so far, with their lengths.
#[derive(Default)]
struct OpenFiles {
    open: HashMap<String, (File, u64)>,
}

impl OpenFiles {
    /// The file and its length; `tensor` is named if it cannot be opened.
    fn get(&mut self, dir: &Path, relative: &str, tensor: &str) -> Result<&(File, u64)> {
        if !self.open.contains_key(relative) {
            let path = dir.join(relative);
            let failed = |action, source| Error::Copy {
                tensor: tensor.to_owned(),
                action,
                path: path.clone(),
                source,
            };
            let file = File::open(&path).map_err(|e| failed("open", e))?;
            let len = file.metadata().map_err(|e| failed("inspect", e))?.len();
            self.open.insert(relative.to_owned(), (file, len));
        }
        Ok(&self.open[relative])
    }
}

fn locate_tensor(
    dir: &Path,
    metadata: &Metadata,
    tensor: &TensorMeta,
    dtype: Dtype,
    files: &mut OpenFiles,
) -> Result<DcpTensor> {
    let metadata_path = dir.join(METADATA_FILE);
    let in_metadata = |reason: String| Error::BadTensor {
        path: metadata_path.clone(),
        tensor: tensor.name.clone(),
        reason,
        hint: "the checkpoint's .metadata is inconsistent; re-save the checkpoint",
    };
    let mut pieces = Vec::with_capacity(tensor.chunks.len());
    for chunk in &tensor.chunks {
        let chunk_region = region(&chunk.offsets, &chunk.sizes);
        let key = (tensor.name.clone(), chunk.offsets.clone());
        let Some(info) = metadata.storage.get(&key) else {
            return Err(in_metadata(format!(
                "chunk {chunk_region} has no storage_data entry"
            )));
        };
        if !is_plain_relative(&info.relative_path) {
            return Err(in_metadata(format!(
                "chunk {chunk_region} is stored in {:?}, outside the checkpoint directory",
                info.relative_path
            )));
        }
        let path = dir.join(&info.relative_path);
        if !info.transforms.is_empty() {
            return Err(Error::BadTensor {
                path,
                tensor: tensor.name.clone(),
                reason: format!(
                    "chunk {chunk_region} was written through stream transforms {:?} (compression), which this program does not undo",
                    info.transforms
                ),
                hint: "re-save the checkpoint without FileSystemWriter extensions such as ZStandard (the default writes plain archives)",
            });
        }
        let (file, file_len) = files.get(dir, &info.relative_path, &tensor.name)?;
        let request = ChunkRequest {
            dtype,
            sizes: &chunk.sizes,
            offset: info.offset,
            length: info.length,
        };
        let data_offset =
            locate_chunk_data(file, *file_len, &request).map_err(|refusal| Error::BadTensor {
                path: path.clone(),
                tensor: tensor.name.clone(),
                reason: format!("chunk {chunk_region}: {}", refusal.reason),
                hint: refusal.hint,
            })?;
        pieces.push(DcpPiece {
            file: info.relative_path.clone(),
            data_offset,
            offsets: chunk.offsets.clone(),
            shape: chunk.sizes.clone(),
        });
    }
    check_tiling(tensor, dtype, &pieces)?;
    Ok(DcpTensor {
        name: tensor.name.clone(),
        dtype,
        shape: tensor.shape.clone(),
        pieces,
    })
}

/// A relative path with no `..` or root: DCP writes files directly in the
/// checkpoint directory, and a `.metadata` must not point elsewhere.
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Checks the chunks tile the full shape (as `dcp::index_pieces` does for
/// safetensors shards).
fn check_tiling(tensor: &TensorMeta, dtype: Dtype, pieces: &[DcpPiece]) -> Result<()> {
    let inconsistent = |reason: String| Error::Inconsistent {
        tensor: tensor.name.clone(),
        reason,
        hint: "the checkpoint's .metadata is inconsistent (chunks missing or overlapping); re-save the checkpoint",
    };
    // Like FullTensor::byte_len's callers, require the size to fit for any
    // dtype up to 8 bytes.
    if byte_len(&tensor.shape, Dtype::F64).is_none() || byte_len(&tensor.shape, dtype).is_none() {
        return Err(inconsistent(format!(
            "full shape {:?} overflows",
            tensor.shape
        )));
    }
    let as_pieces: Vec<Piece> = pieces
        .iter()
        .map(|p| {
            Piece::new(
                Location {
                    shard: 0,
                    offset: 0,
                },
                &p.offsets,
                &p.shape,
            )
        })
        .collect();
    check_coverage(&tensor.shape, &as_pieces).map_err(|fault| {
        inconsistent(match fault {
            CoverageFault::Overlap(a, b) => format!(
                "chunks {} and {} overlap",
                region(&pieces[a].offsets, &pieces[a].shape),
                region(&pieces[b].offsets, &pieces[b].shape)
            ),
            CoverageFault::Gap(start, len) => format!(
                "no chunk covers region {} of full shape {:?}",
                region(&start, &len),
                tensor.shape
            ),
            CoverageFault::Incomplete { covered, total } => format!(
                "chunks cover {covered} of {total} elements of full shape {:?}",
                tensor.shape
            ),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_paths_must_stay_in_the_directory() {
        assert!(is_plain_relative("__0_0.distcp"));
        assert!(is_plain_relative("sub/__0_0.distcp"));
        assert!(!is_plain_relative("../__0_0.distcp"));
        assert!(!is_plain_relative("/etc/passwd"));
        assert!(!is_plain_relative(""));
    }
}
