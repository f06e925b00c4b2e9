//! Finding a chunk's raw bytes inside its torch.save archive.
//!
//! With DCP's default serialization each chunk is a complete `torch.save`
//! zip written into a byte range of a `.distcp` file. The tensor's bytes are
//! the stored (uncompressed) entry `<prefix>/data/<key>`, so the chunk can be
//! copied straight from the `.distcp` file once that entry's offset is known
//! and `<prefix>/data.pkl` confirms the bytes are the chunk, row-major.

use super::pickle::{self, Limits, Node, Value};
use super::torch_types::{torch_dtype, typed_storage_dtype};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{byte_len, element_count};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use zip::read::{ArchiveOffset, Config};
use zip::{CompressionMethod, ZipArchive};

/// The chunk to find, as `.metadata` describes it.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRequest<'a> {
    /// The tensor's element type.
    pub dtype: Dtype,
    /// The chunk's shape.
    pub sizes: &'a [u64],
    /// First byte of the chunk's archive in the file.
    pub offset: u64,
    /// Length of the archive.
    pub length: u64,
}

/// Why a chunk's archive was refused, and what the user can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What is wrong, naming the byte range or entry.
    pub reason: String,
    /// What to do about it.
    pub hint: &'static str,
}

const CORRUPT: &str =
    "the .distcp file is truncated or corrupt; copy it again from where the checkpoint was saved";
const MISMATCH: &str =
    "the .distcp files do not belong to this .metadata; use the files of one save only";
const RESAVE: &str =
    "re-save the checkpoint with torch.distributed.checkpoint's default FileSystemWriter settings";

fn refuse<T>(reason: impl Into<String>, hint: &'static str) -> Result<T, Refusal> {
    Err(Refusal {
        reason: reason.into(),
        hint,
    })
}

/// Most entries a torch.save archive of one tensor has (it has 7); bounds the
/// work on a crafted central directory.
const MAX_ENTRIES: usize = 1024;

/// Largest `data.pkl` read, and largest `byteorder`.
const MAX_SMALL_ENTRY: u64 = 1 << 20;

/// Finds the chunk's data in `file` (of `file_len` bytes) and checks it is
/// exactly the chunk: returns the absolute offset of its first byte.
pub fn locate_chunk_data(file: &File, file_len: u64, chunk: &ChunkRequest) -> Result<u64, Refusal> {
    let range = format!(
        "bytes [{}, {})",
        chunk.offset,
        chunk.offset.saturating_add(chunk.length)
    );
    let end = chunk.offset.checked_add(chunk.length);
    if end.is_none_or(|end| end > file_len) {
        return refuse(
            format!(
                "the chunk's archive at {range} runs past the end of the file ({file_len} bytes)"
            ),
            CORRUPT,
        );
    }
    let mut zip = open_archive(file, chunk, &range)?;
    let entries = list_entries(&mut zip, chunk.length, &range)?;
    let pkl = find_data_pkl(&entries, &range)?;
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    check_byte_order(&mut zip, &entries, prefix, &range)?;
    let rebuild_bytes = read_entry(&mut zip, pkl)?;
    let storage = read_rebuild(&rebuild_bytes, &range)?;
    check_storage(&storage, chunk, &range)?;
    let data_name = format!("{prefix}data/{}", storage.key);
    let Some(data) = entries.iter().find(|e| e.name == data_name) else {
        return refuse(
            format!("the chunk's archive at {range} has no entry {data_name}"),
            CORRUPT,
        );
    };
    let expected = byte_len(chunk.sizes, chunk.dtype).unwrap_or(u64::MAX);
    if data.size != expected {
        return refuse(
            format!(
                "entry {data_name} of the chunk at {range} holds {} bytes, the chunk's {:?} {} elements need {expected}",
                data.size, chunk.sizes, chunk.dtype
            ),
            MISMATCH,
        );
    }
    // list_entries checked that every entry's data lies inside the window,
    // and the window inside the file.
    Ok(chunk.offset + data.data_start)
}

/// The chunk's byte range as a zip archive; its offsets count from the
/// range's start, as PyTorch writes them.
fn open_archive<'f>(
    file: &'f File,
    chunk: &ChunkRequest,
    range: &str,
) -> Result<ZipArchive<Window<'f>>, Refusal> {
    let window = Window::new(file, chunk.offset, chunk.length).or_else(|err| {
        refuse(
            format!("cannot read the chunk's archive at {range}: {err}"),
            CORRUPT,
        )
    })?;
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    ZipArchive::with_config(config, window).or_else(|err| {
        refuse(
            format!("the chunk at {range} is not a torch.save zip archive ({err})"),
            CORRUPT,
        )
    })
}

/// `byteorder` must say little-endian if present (archives from before
/// PyTorch 1.10 lack it and are little-endian).
fn check_byte_order<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    entries: &[Entry],
    prefix: &str,
    range: &str,
) -> Result<(), Refusal> {
    let name = format!("{prefix}byteorder");
    let Some(byteorder) = entries.iter().find(|e| e.name == name) else {
        return Ok(());
    };
    let order = read_entry(zip, byteorder)?;
    if order != b"little" {
        return refuse(
            format!(
                "the chunk at {range} was saved with byte order {:?}; only little-endian is supported",
                String::from_utf8_lossy(&order)
            ),
            "convert the checkpoint on a little-endian machine (load and re-save it with PyTorch)",
        );
    }
    Ok(())
}

/// One zip entry: name, where its stored bytes start (relative to the
/// archive), and its size.
struct Entry {
    index: usize,
    name: String,
    data_start: u64,
    size: u64,
}

fn list_entries<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    archive_len: u64,
    range: &str,
) -> Result<Vec<Entry>, Refusal> {
    if zip.len() > MAX_ENTRIES {
        return refuse(
            format!(
                "the chunk's archive at {range} has {} entries, more than a torch.save archive",
                zip.len()
            ),
            CORRUPT,
        );
    }
    let mut entries = Vec::with_capacity(zip.len());
    for index in 0..zip.len() {
        let bad_zip = |err: zip::result::ZipError| Refusal {
            reason: format!("the chunk's archive at {range}: entry {index} is unreadable ({err})"),
            hint: CORRUPT,
        };
        let file = zip.by_index_raw(index).map_err(bad_zip)?;
        let name = String::from_utf8_lossy(file.name_raw()).into_owned();
        let how = match file.compression() {
            _ if file.encrypted() => Some("encrypted".to_owned()),
            CompressionMethod::Stored if file.compressed_size() == file.size() => None,
            CompressionMethod::DEFLATE => Some("compressed (deflate)".to_owned()),
            other => Some(format!("compressed (zip method {other:?})")),
        };
        if let Some(how) = how {
            return refuse(
                format!(
                    "entry {name} of the chunk's archive at {range} is {how}; torch.save stores entries uncompressed"
                ),
                RESAVE,
            );
        }
        let data_end = file
            .data_start()
            .and_then(|start| start.checked_add(file.size()).map(|end| (start, end)));
        let Some((data_start, data_end)) = data_end else {
            return refuse(
                format!("entry {name} of the chunk's archive at {range} has no local header"),
                CORRUPT,
            );
        };
        if data_end > archive_len {
            return refuse(
                format!(
                    "entry {name} of the chunk's archive at {range} ends past the archive ({data_end} > {archive_len} bytes)"
                ),
                CORRUPT,
            );
        }
        entries.push(Entry {
            index,
            name,
            data_start,
            size: file.size(),
        });
    }
    Ok(entries)
}

fn find_data_pkl<'e>(entries: &'e [Entry], range: &str) -> Result<&'e Entry, Refusal> {
    let mut pkls = entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"));
    match (pkls.next(), pkls.next()) {
        (Some(pkl), None) => Ok(pkl),
        (None, _) => refuse(
            format!(
                "the chunk's archive at {range} has no data.pkl entry (not a torch.save archive)"
            ),
            CORRUPT,
        ),
        (Some(_), Some(_)) => refuse(
            format!("the chunk's archive at {range} has several data.pkl entries"),
            CORRUPT,
        ),
    }
}

fn read_entry<R: Read + Seek>(zip: &mut ZipArchive<R>, entry: &Entry) -> Result<Vec<u8>, Refusal> {
    if entry.size > MAX_SMALL_ENTRY {
        return refuse(
            format!(
                "entry {} is {} bytes, more than a torch.save archive holds there",
                entry.name, entry.size
            ),
            CORRUPT,
        );
    }
    let mut bytes = Vec::with_capacity(entry.size as usize);
    // by_index checks the CRC-32 once the entry is read to its end.
    let read = zip
        .by_index(entry.index)
        .map_err(io::Error::other)
        .and_then(|mut file| file.read_to_end(&mut bytes));
    match read {
        Ok(_) => Ok(bytes),
        Err(err) => refuse(
            format!("entry {} is unreadable ({err})", entry.name),
            CORRUPT,
        ),
    }
}

/// What data.pkl says about the tensor's storage.
#[derive(Debug, PartialEq, Eq)]
struct Storage {
    /// The torch dtype name of the tensor's elements.
    dtype: &'static str,
    /// Bytes the storage holds (element count × element size for typed
    /// storages, the byte count for untyped ones).
    bytes: Option<u64>,
    /// The storage's key: its bytes are entry `data/<key>`.
    key: String,
    storage_offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// Interprets `_rebuild_tensor_v2(storage, offset, size, stride, ...)` or
/// `_rebuild_tensor_v3(..., dtype)`, with `storage` a persistent id
/// `('storage', StorageClass, key, location, numel)`.
fn read_rebuild(bytes: &[u8], range: &str) -> Result<Storage, Refusal> {
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
fn check_storage(storage: &Storage, chunk: &ChunkRequest, range: &str) -> Result<(), Refusal> {
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

/// A read-only view of `[start, start + len)` of a file, with positions
/// relative to `start`; reads use `pread`, so no shared file cursor moves.
///
/// A torch.save archive is small headers, the tensor's bytes, then the
/// central directory: the zip reader only ever looks at the first and last
/// few KiB. Both are read once up front, so locating a chunk costs two reads
/// whatever the zip reader's access pattern, and never reads tensor data.
struct Window<'f> {
    file: &'f File,
    start: u64,
    len: u64,
    pos: u64,
    head: Vec<u8>,
    /// The last `tail.len()` bytes of the window.
    tail: Vec<u8>,
}

/// How much of each end of an archive is read up front.
const END_CACHE: u64 = 4096;

impl<'f> Window<'f> {
    fn new(file: &'f File, start: u64, len: u64) -> io::Result<Window<'f>> {
        let head_len = len.min(END_CACHE);
        let tail_len = (len - head_len).min(END_CACHE);
        let mut head = vec![0; head_len as usize];
        file.read_exact_at(&mut head, start)?;
        let mut tail = vec![0; tail_len as usize];
        file.read_exact_at(&mut tail, start + len - tail_len)?;
        Ok(Window {
            file,
            start,
            len,
            pos: 0,
            head,
            tail,
        })
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let head_len = self.head.len() as u64;
        let tail_start = self.len - self.tail.len() as u64;
        // Short reads are allowed: a read that crosses out of a cached end
        // returns the cached part, and the caller asks again.
        let read = if self.pos < head_len {
            let from = &self.head[self.pos as usize..];
            let n = want.min(from.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else if self.pos >= tail_start {
            let from = &self.tail[(self.pos - tail_start) as usize..];
            let n = want.min(from.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else {
            let until_tail = usize::try_from(tail_start - self.pos).unwrap_or(usize::MAX);
            let n = want.min(until_tail);
            self.file.read_at(&mut buf[..n], self.start + self.pos)?
        };
        self.pos += read as u64;
        Ok(read)
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(n) => {
                self.pos = n;
                Ok(n)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the chunk",
            )),
        }
    }
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

    #[test]
    fn window_reads_stay_inside_the_range() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, b"0123456789").unwrap();
        let mut window = Window::new(&file, 3, 4).unwrap();
        let mut text = String::new();
        window.read_to_string(&mut text).unwrap();
        assert_eq!(text, "3456");
        assert_eq!(window.seek(SeekFrom::End(-1)).unwrap(), 3);
        assert!(window.seek(SeekFrom::Current(-9)).is_err());
        let mut rest = Vec::new();
        window.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"6");
    }

    #[test]
    fn window_reads_across_cached_ends_and_the_middle() {
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let (start, len) = (100usize, 15_000usize);
        let expected = &bytes[start..start + len];
        let mut window = Window::new(&file, start as u64, len as u64).unwrap();
        let mut all = Vec::new();
        window.read_to_end(&mut all).unwrap();
        assert_eq!(all, expected);
        // Spans that start in the head, the middle or the tail and cross
        // into the next region.
        for (from, count) in [
            (4000, 200),
            (4096, 10),
            (10_800, 300),
            (10_904, 96),
            (14_990, 10),
        ] {
            window.seek(SeekFrom::Start(from)).unwrap();
            let mut got = vec![0; count];
            window.read_exact(&mut got).unwrap();
            assert_eq!(
                got,
                &expected[from as usize..from as usize + count],
                "{from}"
            );
        }
        let mut past = [0u8; 1];
        window.seek(SeekFrom::Start(len as u64)).unwrap();
        assert_eq!(window.read(&mut past).unwrap(), 0);
    }
}
