//! Finding a chunk's raw bytes inside its torch.save archive.
//!
//! With DCP's default serialization each chunk is a complete `torch.save`
//! zip written into a byte range of a `.distcp` file. The tensor's bytes are
//! the stored (uncompressed) entry `<prefix>/data/<key>`, so the chunk can be
//! copied straight from the `.distcp` file once that entry's offset is known
//! and `<prefix>/data.pkl` confirms the bytes are the chunk, row-major.

mod data_pkl;

use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::byte_len;
use data_pkl::{check_storage, read_rebuild};
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

/// Where a chunk's bytes are, and the checksum stored with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkData {
    /// Absolute offset of the chunk's first byte in the file.
    pub offset: u64,
    /// The CRC-32 its zip entry stores for those bytes; 0 when the writer
    /// recorded none (`torch.serialization.set_crc32_options(False)`).
    pub crc32: u32,
    /// Bytes of the file read to locate and check it (both ends of the
    /// archive, and whatever the zip reader asked for between them).
    pub bytes_read: u64,
}

/// Finds the chunk's data in `file` (of `file_len` bytes) and checks it is
/// exactly the chunk: returns where its first byte is and its stored CRC-32
/// (not checked here: that would read every byte; `--verify` does).
pub fn locate_chunk_data(
    file: &File,
    file_len: u64,
    chunk: &ChunkRequest,
) -> Result<ChunkData, Refusal> {
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
    refuse_duplicate_names(&zip, file, chunk, &range)?;
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
    let (offset, crc32) = (chunk.offset + data.data_start, data.crc32);
    Ok(ChunkData {
        offset,
        crc32,
        bytes_read: zip.into_inner().bytes_read,
    })
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

/// Refuses an archive whose central directory names one entry twice. The
/// zip reader keeps one entry per name (the later one's data under the
/// earlier one's place) while `torch.load` reads the first: the two
/// would disagree on the chunk's bytes.
fn refuse_duplicate_names<R: Read + Seek>(
    zip: &ZipArchive<R>,
    file: &File,
    chunk: &ChunkRequest,
    range: &str,
) -> Result<(), Refusal> {
    if !zip.has_duplicate_names() {
        return Ok(());
    }
    let name = first_repeated_name(file, chunk, zip.central_directory_start())
        .unwrap_or_else(|| "(unreadable name)".to_owned());
    refuse(
        format!("the chunk's archive at {range} holds two entries named {name}"),
        "the .distcp file was not written by torch.save (or was altered): a zip with repeated entry names is read differently by different readers; re-save the checkpoint",
    )
}

/// The first name that appears twice in the central directory starting at
/// `dir_start` (relative to the archive), read with one positioned read.
fn first_repeated_name(file: &File, chunk: &ChunkRequest, dir_start: u64) -> Option<String> {
    const RECORD: usize = 46;
    let len = chunk.length.checked_sub(dir_start)?.min(MAX_SMALL_ENTRY);
    let mut dir = vec![0u8; usize::try_from(len).ok()?];
    file.read_exact_at(&mut dir, chunk.offset + dir_start)
        .ok()?;
    let field = |at: usize| -> Option<usize> {
        Some(u16::from_le_bytes(dir.get(at..at + 2)?.try_into().ok()?).into())
    };
    let mut seen = std::collections::HashSet::new();
    let mut at = 0;
    while dir.get(at..at + 4) == Some(b"PK\x01\x02".as_slice()) {
        let (name_len, extra_len, comment_len) =
            (field(at + 28)?, field(at + 30)?, field(at + 32)?);
        let name = dir.get(at + RECORD..at + RECORD + name_len)?;
        if !seen.insert(name) {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        at += RECORD + name_len + extra_len + comment_len;
    }
    None
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
/// archive), its size and its stored CRC-32.
struct Entry {
    index: usize,
    name: String,
    data_start: u64,
    size: u64,
    crc32: u32,
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
            crc32: file.crc32(),
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
    /// Bytes read from the file so far (the ends, then any middle reads).
    bytes_read: u64,
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
            bytes_read: head_len + tail_len,
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
            let n = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
            self.bytes_read += n as u64;
            n
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
