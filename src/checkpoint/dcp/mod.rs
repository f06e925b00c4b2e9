//! Reading PyTorch DCP's default on-disk format (`FileSystemWriter`) without
//! Python: the `.metadata` pickle and the `__R_I.distcp` files.
//!
//! [`pickle`] reads a pickle without running anything; [`metadata`] turns
//! `.metadata` into tensors, chunks and byte ranges; [`archive`] finds a
//! chunk's bytes inside its torch.save zip and checks them against the
//! metadata; [`locate`] does that for the pieces a rank reads.
//! [`read_checkpoint`] (the run's) stops at the archives: each piece points
//! at its archive, and each rank locates its own after the plan.
//! [`read_dcp_checkpoint`] does all of it and returns, for every tensor,
//! where each piece's raw row-major bytes are.

pub mod archive;
pub mod locate;
pub mod metadata;
pub mod pickle;
pub mod torch_types;

use crate::checkpoint::coverage::region;
use crate::checkpoint::identity::{Inputs, open_identified, open_input};
use crate::checkpoint::select::Selection;
use crate::checkpoint::{
    Checkpoint, FullTensor, Location, Piece, PieceHints, TensorSpec, tensor_from_pieces,
};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::byte_len;
use metadata::{Entry, Metadata, MetadataError, TensorMeta, TorchDtype};
use pickle::{Limits, PickleErrorKind};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The metadata file's name inside a DCP checkpoint directory.
pub const METADATA_FILE: &str = ".metadata";

/// A DCP checkpoint directory, read and checked.
#[derive(Clone, Debug)]
pub struct DcpCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The `.distcp` files the pieces are in, as full paths, in the order
    /// they were first used (`Location::shard` indexes them).
    pub files: Vec<PathBuf>,
    /// The tensors, in the order of the saved state dict, each with pieces
    /// located, verified against their archives and tiling its shape.
    pub tensors: Vec<FullTensor>,
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
    /// `.metadata` and then `files`, with what each was when opened.
    pub inputs: Inputs,
    /// Each tensor's top-level key in the state dict given to `dcp.save`,
    /// when planner_data records one (see `Checkpoint::top_level_keys`).
    pub top_level_keys: BTreeMap<String, String>,
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

/// Reads a DCP checkpoint into the checkpoint model every format shares:
/// the tensors `select` keeps, their chunks tiling them; the names of non-tensor
/// entries; and the tensors left out, with their bytes. A kept tensor of a
/// dtype safetensors cannot hold is an error naming it.
///
/// No chunk is located here: every piece points at its archive
/// ([`Location::archive_len`]), and each rank locates the pieces it copies
/// once the plan says which ([`locate::locate_pieces`]). The chunk files
/// are opened (regular files only; identity taken, nothing read)
/// unless `plan_only` (see [`crate::checkpoint::ReadOptions::plan_only`]).
pub fn read_checkpoint(dir: &Path, select: &Selection, plan_only: bool) -> Result<Checkpoint> {
    let archives = match plan_only {
        true => Archives::Unopened,
        false => Archives::Opened,
    };
    let dcp = read_dcp_unlocated(dir, &|name| select.keeps(name), archives)?;
    if let Some(unsupported) = dcp.unsupported.first() {
        return Err(unsupported.error(dir));
    }
    let mut tensors = dcp.tensors;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Checkpoint {
        files: dcp.files,
        tensors,
        skipped_outputs: Vec::new(),
        non_tensors: dcp.non_tensors,
        excluded: dcp.excluded,
        inputs: dcp.inputs,
        top_level_keys: dcp.top_level_keys,
        notes: Vec::new(),
    })
}

/// Whether `dir` looks like a DCP FileSystemWriter checkpoint: it has an
/// entry named `.metadata`, whatever it is (the reader then says what is
/// wrong with one that is not a regular file).
pub fn is_dcp_checkpoint(dir: &Path) -> bool {
    dir.join(METADATA_FILE).symlink_metadata().is_ok()
}

/// Reads a DCP checkpoint directory: every tensor, every chunk located and
/// checked (the library's reading; a run locates per rank instead).
pub fn read_dcp_checkpoint(dir: &Path) -> Result<DcpCheckpoint> {
    read_dcp_checkpoint_with(dir, &|_| true)
}

/// Reads a DCP checkpoint directory, locating only the tensors `keep`
/// accepts (reading a chunk's archive costs a few small reads, so leaving
/// out optimizer state saves most of them). Every file is opened once,
/// without blocking, refused unless it is a regular file, and its identity
/// taken from the open descriptor before anything is read from it.
pub fn read_dcp_checkpoint_with(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<DcpCheckpoint> {
    let mut checkpoint = read_dcp_unlocated(dir, keep, Archives::Opened)?;
    let names: Vec<String> = checkpoint.tensors.iter().map(|t| t.name.clone()).collect();
    let every_piece: Vec<(usize, usize)> = (checkpoint.tensors.iter().enumerate())
        .flat_map(|(t, tensor)| (0..tensor.pieces.len()).map(move |p| (t, p)))
        .collect();
    let wanted = locate::Wanted {
        names: &names,
        files: &checkpoint.files,
        pieces: &every_piece,
    };
    locate::locate_pieces(&mut checkpoint.tensors, &wanted)?;
    Ok(checkpoint)
}

/// How far a read goes into the chunk files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Archives {
    /// From `.metadata` alone: no chunk file is opened (`--dry-run`).
    Unopened,
    /// Every chunk file a kept tensor uses is opened once, refused unless
    /// it is a regular file, and its identity recorded (no byte read); no
    /// chunk is located.
    Opened,
}

/// [`read_dcp_checkpoint_with`] without locating: each piece points at the
/// start of its archive, and the chunk files are opened or not as
/// `archives` says.
fn read_dcp_unlocated(
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
    archives: Archives,
) -> Result<DcpCheckpoint> {
    let metadata_path = dir.join(METADATA_FILE);
    let mut files = OpenFiles::default();
    let metadata = read_metadata_into(&metadata_path, &mut files.inputs)?;
    let mut checkpoint = DcpCheckpoint {
        dir: dir.to_owned(),
        files: Vec::new(),
        tensors: Vec::new(),
        non_tensors: Vec::new(),
        unsupported: Vec::new(),
        skipped: Vec::new(),
        excluded: Vec::new(),
        inputs: Inputs::default(),
        top_level_keys: BTreeMap::new(),
    };
    for entry in &metadata.entries {
        let tensor = match entry {
            Entry::NonTensor(name) => {
                checkpoint.non_tensors.push(name.clone());
                continue;
            }
            Entry::Tensor(tensor) => tensor,
        };
        if let Some(key) = &tensor.top_level_key {
            checkpoint
                .top_level_keys
                .insert(tensor.name.clone(), key.clone());
        }
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
        let pieces = tensor_pieces(dir, &metadata, tensor, dtype, &mut files, archives)?;
        checkpoint.tensors.push(pieces);
    }
    // Unopened chunk files are inputs all the same: signed (one rank per
    // view of INPUT_DIR) for the fingerprint and the comparison across ranks.
    if archives == Archives::Unopened {
        for path in &files.paths {
            files.inputs.push_unopened(path.clone());
        }
    }
    checkpoint.files = files.paths;
    checkpoint.inputs = files.inputs;
    Ok(checkpoint)
}

/// Test hook: the environment variable naming a FIFO that the reader opens
/// and reads to its end once it has read everything it reads from the
/// inputs, so that a test can change an input at exactly that moment (after
/// this rank located its chunks, before anything is copied). Unset in real
/// runs; read nowhere else.
pub const HOLD_AFTER_READ_VAR: &str = "ST_CONSOLIDATE_TEST_HOLD_AFTER_READ";

/// The [`HOLD_AFTER_READ_VAR`] test hook: the run calls it once this rank
/// has located the chunks it copies.
pub fn hold_after_read() {
    if let Some(path) = std::env::var_os(HOLD_AFTER_READ_VAR) {
        // A test hook: whatever happens to the FIFO, the run goes on.
        let _ = File::open(path).and_then(|mut fifo| fifo.read_to_end(&mut Vec::new()));
    }
}

/// Reads and parses a `.metadata` file.
pub fn read_metadata_file(path: &Path) -> Result<Metadata> {
    read_metadata_into(path, &mut Inputs::default())
}

/// Reads and parses a `.metadata` file, adding it to `inputs` as opened.
/// The file is read through a small window (twice: the pickle's memo scan,
/// then the parse), never held whole.
fn read_metadata_into(path: &Path, inputs: &mut Inputs) -> Result<Metadata> {
    let max = Limits::METADATA.max_input as u64;
    let (file, seen) = open_input(path)?;
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
    inputs.push_opened(path.to_owned(), seen);
    let (parsed, _) = metadata::parse_metadata_from(&mut &file, len as usize);
    parsed.map_err(|err| metadata_error(path, err))
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
    if let Some(refusal) = &err.pickle {
        let hint = match refusal.kind {
            PickleErrorKind::Unreadable(_) => {
                "the file system failed while it was read; check the storage, then run again"
            }
            PickleErrorKind::ForbiddenGlobal(_) => {
                "either a newer PyTorch saved a class this program does not know yet (report its name so it can be reviewed and allowed), or the file was made to run code: do not load it in Python before checking where it came from"
            }
            _ => {
                "the file is truncated or corrupt, or not a DCP checkpoint's .metadata; copy it again or re-save the checkpoint"
            }
        };
        return bad_metadata(path, err.reason, hint);
    }
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

/// `.distcp` files named so far, each with its index in `paths`; those
/// opened; and every input as opened.
#[derive(Default)]
struct OpenFiles {
    index: HashMap<String, usize>,
    opened: HashSet<usize>,
    paths: Vec<PathBuf>,
    inputs: Inputs,
}

impl OpenFiles {
    /// The file's index, without opening it (all a plan-only read needs).
    fn index_of(&mut self, dir: &Path, relative: &str) -> usize {
        if let Some(&index) = self.index.get(relative) {
            return index;
        }
        self.paths.push(dir.join(relative));
        self.index.insert(relative.to_owned(), self.paths.len() - 1);
        self.paths.len() - 1
    }

    /// The file's index, opened (and its identity recorded; nothing is read
    /// from it: its signature is taken by the rank whose share it is) the
    /// first time it is named; `tensor` is named if it cannot be.
    fn get(&mut self, dir: &Path, relative: &str, tensor: &str) -> Result<usize> {
        let index = self.index_of(dir, relative);
        if self.opened.insert(index) {
            let path = self.paths[index].clone();
            let (_, seen) =
                open_identified(&path).map_err(|err| locate::naming_tensor(err, tensor))?;
            self.inputs.push_opened(path, seen);
        }
        Ok(index)
    }
}

/// The DCP reader's hints for pieces that do not tile their tensor: the
/// chunks come from `.metadata`.
const CHUNK_HINTS: PieceHints = PieceHints {
    holder: "chunk",
    corrupt: "the checkpoint's .metadata is inconsistent; re-save the checkpoint",
    overlap: "the checkpoint's .metadata is inconsistent (chunks overlapping); re-save the checkpoint",
    missing: "the checkpoint's .metadata is inconsistent (chunks missing); re-save the checkpoint",
};

/// One kept tensor's pieces from `.metadata`, each pointing at its
/// archive, tiling the tensor (checked here, on whichever rank reads
/// `.metadata`). Opens each chunk file on first use unless `archives` is
/// [`Archives::Unopened`].
fn tensor_pieces(
    dir: &Path,
    metadata: &Metadata,
    tensor: &TensorMeta,
    dtype: Dtype,
    files: &mut OpenFiles,
    archives: Archives,
) -> Result<FullTensor> {
    let metadata_path = dir.join(METADATA_FILE);
    let in_metadata = |reason: String| Error::BadTensor {
        path: metadata_path.clone(),
        tensor: tensor.name.clone(),
        reason,
        hint: "the checkpoint's .metadata is inconsistent; re-save the checkpoint",
    };
    let mut pieces = Vec::with_capacity(tensor.chunks.len());
    for meta in &tensor.chunks {
        let chunk = metadata.chunk(tensor, meta);
        let chunk_region = region(chunk.offsets, chunk.sizes);
        let Some(info) = meta.storage else {
            return Err(in_metadata(format!(
                "chunk {chunk_region} has no storage_data entry"
            )));
        };
        let relative_path = &metadata.files[info.file as usize];
        if !is_plain_relative(relative_path) {
            return Err(in_metadata(format!(
                "chunk {chunk_region} is stored in {relative_path:?}, outside the checkpoint directory"
            )));
        }
        let transforms = &metadata.transforms[info.transforms as usize];
        if !transforms.is_empty() {
            return Err(Error::BadTensor {
                path: dir.join(relative_path),
                tensor: tensor.name.clone(),
                reason: format!(
                    "chunk {chunk_region} was written through stream transforms {transforms:?} (compression), which this program does not undo"
                ),
                hint: "re-save the checkpoint without FileSystemWriter extensions such as ZStandard (the default writes plain archives)",
            });
        }
        let shard = match archives {
            Archives::Unopened => files.index_of(dir, relative_path),
            Archives::Opened => files.get(dir, relative_path, &tensor.name)?,
        };
        let location = Location {
            shard,
            offset: info.offset,
            crc32: None,
            archive_len: Some(info.length),
        };
        pieces.push(Piece::new(location, chunk.offsets, chunk.sizes));
    }
    let spec = TensorSpec {
        name: &tensor.name,
        dtype,
        shape: Some(&tensor.shape),
        hints: &CHUNK_HINTS,
    };
    tensor_from_pieces(&spec, pieces, &files.paths)
}

/// A relative path with no `..` or root: DCP writes files directly in the
/// checkpoint directory, and a `.metadata` must not point elsewhere.
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
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
