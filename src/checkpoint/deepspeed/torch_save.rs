//! A `torch.save` file as DeepSpeed writes it (`*_model_states.pt`,
//! `*_optim_states.pt`): a zip archive of stored (uncompressed) entries,
//! `<name>/data.pkl` and one `<name>/data/<key>` entry per storage. Opening
//! one reads its central directory and its `data.pkl`, parsed by the safe
//! pickle interpreter; no storage byte is read. A tensor in the pickle is
//! then a [`TensorRef`]: its storage's entry, offset, shape and dtype, from
//! which the reader computes where each of its elements lies in the file.

use crate::checkpoint::dcp::pickle::{self, Limits, Node, Pickle, Value};
use crate::checkpoint::dcp::torch_types::{torch_dtype, typed_storage_dtype};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use zip::{CompressionMethod, ZipArchive};

/// What to do about a file that is not a readable torch.save archive.
pub const CORRUPT: &str = "the file is truncated or corrupt; copy the checkpoint folder again from where DeepSpeed saved it";

/// A storage's bytes in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StorageEntry {
    /// Absolute offset of its first byte.
    offset: u64,
    /// Its length in bytes.
    len: u64,
}

/// A torch.save file, its pickle parsed and its storages' places known.
#[derive(Debug)]
pub struct TorchSave {
    /// The file.
    pub path: PathBuf,
    /// Its `data.pkl`, parsed.
    pub pickle: Pickle,
    /// Each storage key's bytes.
    storages: HashMap<String, StorageEntry>,
}

/// A tensor as the pickle describes it: a row-major view of a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// Its element type, from the storage's class.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Absolute offset in the file of its first element.
    pub offset: u64,
}

impl TensorRef {
    /// Elements in the tensor.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Absolute offset of element `index` (row-major).
    pub fn element_offset(&self, index: u64) -> u64 {
        self.offset + index * self.dtype.size()
    }
}

impl TorchSave {
    /// Opens `file` (already opened from `path`, `len` bytes long), checks
    /// it is a torch.save archive this reader can take bytes from, and parses
    /// its `data.pkl`.
    pub fn open(path: &Path, file: &File, len: u64) -> Result<TorchSave> {
        let bad = |reason: String| bad_file(path, reason, CORRUPT);
        let mut zip = ZipArchive::new(BlockReader::new(file, len))
            .map_err(|e| bad(format!("not a torch.save zip archive ({e})")))?;
        if zip.has_duplicate_names() {
            return Err(bad(
                "its zip directory names one entry twice; torch.save never writes that".into(),
            ));
        }
        let mut pkl = None;
        let mut byteorder = None;
        let mut entries = Vec::with_capacity(zip.len());
        for index in 0..zip.len() {
            let entry = zip
                .by_index_raw(index)
                .map_err(|e| bad(format!("zip entry {index} is unreadable ({e})")))?;
            let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
            let stored = entry.compression() == CompressionMethod::Stored
                && !entry.encrypted()
                && entry.compressed_size() == entry.size();
            if !stored {
                return Err(bad(format!(
                    "entry {name} is compressed or encrypted; torch.save stores entries as they are"
                )));
            }
            let start = entry.data_start();
            let end = start.and_then(|s| s.checked_add(entry.size()));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad(format!("entry {name} has no local header")));
            };
            if end > len {
                return Err(bad(format!(
                    "entry {name} ends at byte {end}, past the end of the file ({len} bytes)"
                )));
            }
            if name.ends_with("/data.pkl") || name == "data.pkl" {
                if pkl.replace((index, name.clone(), entry.size())).is_some() {
                    return Err(bad("it holds two data.pkl entries".into()));
                }
            } else if name.ends_with("/byteorder") || name == "byteorder" {
                byteorder = Some(index);
            }
            entries.push((
                name,
                StorageEntry {
                    offset: start,
                    len: entry.size(),
                },
            ));
        }
        let Some((pkl_index, pkl_name, pkl_len)) = pkl else {
            return Err(bad("it has no data.pkl entry: not a torch.save file".into()));
        };
        let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
        if let Some(index) = byteorder {
            let order = read_entry(&mut zip, index, 64).map_err(&bad)?;
            if order != b"little" {
                return Err(bad_file(
                    path,
                    format!(
                        "saved with byte order {:?}; only little-endian is supported",
                        String::from_utf8_lossy(&order)
                    ),
                    "load and re-save the checkpoint on a little-endian machine",
                ));
            }
        }
        let max = Limits::METADATA.max_input as u64;
        if pkl_len > max {
            return Err(bad(format!(
                "its data.pkl is {pkl_len} bytes, more than the {max} a checkpoint's pickle may have"
            )));
        }
        let bytes = read_entry(&mut zip, pkl_index, max).map_err(&bad)?;
        let pickle = pickle::parse(&bytes, &Limits::METADATA).map_err(|e| {
            bad_file(
                path,
                format!("{pkl_name}: {e}"),
                "only DeepSpeed's own checkpoint pickles are read (no code in a pickle is ever run); \
                 if DeepSpeed wrote this file, report the global it names",
            )
        })?;
        let data_prefix = format!("{prefix}data/");
        let storages = entries
            .into_iter()
            .filter_map(|(name, entry)| {
                let key = name.strip_prefix(&data_prefix)?;
                Some((key.to_owned(), entry))
            })
            .collect();
        Ok(TorchSave {
            path: path.to_owned(),
            pickle,
            storages,
        })
    }

    /// A `data.pkl` alone, as a file with no storage entries would hold it:
    /// for the fuzz target, which interprets any bytes.
    pub fn from_pickle(path: &Path, data: &[u8]) -> Result<TorchSave> {
        let pickle = pickle::parse(data, &Limits::METADATA)
            .map_err(|e| bad_file(path, e.to_string(), CORRUPT))?;
        Ok(TorchSave {
            path: path.to_owned(),
            pickle,
            storages: HashMap::new(),
        })
    }

    /// The tensor `value` rebuilds (`_rebuild_tensor_v2`/`_v3`, possibly
    /// wrapped in `_rebuild_from_type_v2` as ZeRO-3's flat groups are), with
    /// its place in the file; `what` names it in errors. The tensor must be
    /// a contiguous row-major view lying inside its storage's entry.
    pub fn tensor(&self, value: Value, what: &str) -> Result<TensorRef> {
        let bad = |reason: String| self.bad(format!("{what}: {reason}"));
        let Some(call) = self.pickle.object(value) else {
            return Err(bad(format!(
                "is a {}, not a tensor",
                self.pickle.describe(value)
            )));
        };
        let mut args = self.pickle.tuple(call.args).unwrap_or_default();
        let v3 = call.class.is("torch._utils", "_rebuild_tensor_v3");
        if call.class.is("torch._tensor", "_rebuild_from_type_v2") {
            // (_rebuild_tensor_v2, torch.Tensor, (args...), {attributes}).
            let inner = args.get(2).and_then(|a| self.pickle.tuple(*a));
            let func = args.first().and_then(|f| self.pickle.global(*f));
            let (Some(inner), Some(func)) = (inner, func) else {
                return Err(bad(
                    "a _rebuild_from_type_v2 call of an unexpected form".into()
                ));
            };
            if !func.is("torch._utils", "_rebuild_tensor_v2") {
                return Err(bad(format!(
                    "rebuilt through {func}, not _rebuild_tensor_v2"
                )));
            }
            args = inner;
        } else if !v3 && !call.class.is("torch._utils", "_rebuild_tensor_v2") {
            return Err(bad(format!("is a {} object, not a tensor", call.class)));
        }
        if args.len() < if v3 { 7 } else { 6 } {
            return Err(bad(format!(
                "its rebuild call has only {} arguments",
                args.len()
            )));
        }
        let pid = match self.pickle.node(args[0]) {
            Some(Node::PersistentId(pid)) => self.pickle.tuple(*pid).unwrap_or_default(),
            _ => return Err(bad("its storage is not a persistent id".into())),
        };
        let [kind, class, key, _location, _numel] = pid else {
            return Err(bad(format!(
                "its storage id has {} items, not 5",
                pid.len()
            )));
        };
        let class = self
            .pickle
            .global(*class)
            .filter(|_| self.pickle.str(*kind) == Some("storage"));
        let (Some(class), Some(key)) = (class, self.pickle.str(*key)) else {
            return Err(bad(
                "its storage id is not ('storage', class, key, location, size)".into(),
            ));
        };
        let torch_name = match typed_storage_dtype(class.name).filter(|_| class.module == "torch") {
            Some(name) => name,
            None if v3 && class.name == "UntypedStorage" => {
                match self.pickle.global(args[6]).filter(|g| g.module == "torch") {
                    Some(global) => global.name,
                    None => return Err(bad("its dtype is not a torch dtype".into())),
                }
            }
            None => {
                return Err(bad(format!(
                    "storage class {class} does not say the element type"
                )));
            }
        };
        let Some(dtype) = torch_dtype(torch_name).flatten() else {
            return Err(bad_file(
                &self.path,
                format!("{what}: its dtype torch.{torch_name} has no safetensors equivalent"),
                "leave this tensor out of the export (--exclude)",
            ));
        };
        let ints = |value: Value, name: &str| -> Result<Vec<u64>> {
            let items = self
                .pickle
                .sequence(value)
                .ok_or_else(|| bad(format!("its {name} is not a tuple")))?;
            items
                .iter()
                .map(|item| match item {
                    Value::Int(n) if *n >= 0 => Ok(*n as u64),
                    _ => Err(bad(format!(
                        "its {name} holds a negative or non-integer item"
                    ))),
                })
                .collect()
        };
        let Value::Int(storage_offset) = args[1] else {
            return Err(bad("its storage offset is not an integer".into()));
        };
        let storage_offset = u64::try_from(storage_offset)
            .map_err(|_| bad("its storage offset is negative".into()))?;
        let shape = ints(args[2], "size")?;
        let stride = ints(args[3], "stride")?;
        if stride.len() != shape.len() || !is_row_major(&shape, &stride) {
            return Err(bad(format!(
                "size {shape:?} with stride {stride:?} is not a contiguous row-major tensor"
            )));
        }
        let Some(entry) = self.storages.get(key) else {
            return Err(bad(format!(
                "its storage {key} has no entry in the archive"
            )));
        };
        let size = dtype.size();
        let numel = shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
        let end = numel.and_then(|n| n.checked_add(storage_offset)?.checked_mul(size));
        if end.is_none_or(|end| end > entry.len) {
            return Err(bad(format!(
                "size {shape:?} from element {storage_offset} runs past its storage's {} bytes",
                entry.len
            )));
        }
        Ok(TensorRef {
            dtype,
            shape,
            offset: entry.offset + storage_offset * size,
        })
    }

    /// An error about this file's contents.
    pub fn bad(&self, reason: String) -> Error {
        bad_file(&self.path, reason, CORRUPT)
    }
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size
/// 1 may have any stride: torch does not normalize them).
fn is_row_major(shape: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (dim, step) in shape.iter().zip(stride).rev() {
        if *dim != 1 && *step != expected {
            return false;
        }
        expected = expected.saturating_mul(*dim);
    }
    true
}

fn read_entry(
    zip: &mut ZipArchive<BlockReader>,
    index: usize,
    max: u64,
) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    // by_index checks the entry's CRC-32 once it is read to its end.
    zip.by_index(index)
        .map_err(std::io::Error::other)
        .and_then(|entry| entry.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("zip entry {index} is unreadable ({e})"))?;
    if bytes.len() as u64 > max {
        return Err(format!("zip entry {index} is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// A file read through one cached block: the zip reader parses the
/// central directory and each entry's local header with many small reads
/// and seeks (a ZeRO-3 model-states file has an entry per parameter), and
/// this turns them into one positioned read per block touched. Seeks only
/// move the position.
struct BlockReader<'f> {
    file: &'f File,
    len: u64,
    pos: u64,
    block_start: u64,
    block: Vec<u8>,
}

/// Bytes read at once.
const BLOCK: u64 = 64 * 1024;

impl<'f> BlockReader<'f> {
    fn new(file: &'f File, len: u64) -> BlockReader<'f> {
        BlockReader {
            file,
            len,
            pos: 0,
            block_start: 0,
            block: Vec::new(),
        }
    }
}

impl Read for BlockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let cached = self.block_start..self.block_start + self.block.len() as u64;
        if !cached.contains(&self.pos) {
            if self.pos >= self.len {
                return Ok(0);
            }
            // Reads larger than a block (data.pkl) go straight through.
            if buf.len() as u64 >= BLOCK {
                let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            let start = self.pos - self.pos % 4096;
            let want = BLOCK.min(self.len - start) as usize;
            self.block.resize(want, 0);
            let n = std::os::unix::fs::FileExt::read_at(self.file, &mut self.block, start)?;
            self.block.truncate(n);
            self.block_start = start;
            if n == 0 || self.pos >= start + n as u64 {
                return Ok(0);
            }
        }
        let from = &self.block[(self.pos - self.block_start) as usize..];
        let n = from.len().min(buf.len());
        buf[..n].copy_from_slice(&from[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for BlockReader<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

/// An error about the contents of a checkpoint file.
pub fn bad_file(path: &Path, reason: String, hint: &str) -> Error {
    Error::BadCheckpoint {
        path: path.to_owned(),
        reason,
        hint: hint.to_owned(),
    }
}
