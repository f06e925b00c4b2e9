//! The compact binary form of a [`Checkpoint`] that `--headers shared`
//! sends from the rank that read `.metadata` to the others.
//!
//! What is sent is the model every rank needs for the plan: tensor names,
//! dtypes and shapes, and each piece's block and location (for a DCP chunk
//! not located yet, its archive's file, offset and length), plus the lists
//! the report and the identity checks use. Numbers are LEB128 varints and
//! strings and paths length-prefixed bytes, so a row chunk costs about 20
//! bytes (JSON spent about 150) and paths need not be UTF-8.
//!
//! Decoding never trusts the bytes: every count is checked against what is
//! left, and anything malformed is an error, never a panic or a huge
//! allocation.

use crate::checkpoint::identity::Inputs;
use crate::checkpoint::{
    Checkpoint, FullTensor, Location, Piece, PieceHints, TensorSpec, tensor_from_pieces,
};
use crate::safetensors::dtype::Dtype;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The first bytes of every encoding: the format's name and version.
const MAGIC: &[u8; 8] = b"stck\x00\x00\x00\x01";

/// `checkpoint` as bytes (its inputs by path only: what a rank saw when it
/// opened a file means nothing on another node).
pub fn encode(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut out = Writer(MAGIC.to_vec());
    out.paths(&checkpoint.files);
    out.number(checkpoint.tensors.len() as u64);
    for tensor in &checkpoint.tensors {
        out.bytes(tensor.name.as_bytes());
        out.bytes(tensor.dtype.name().as_bytes());
        out.numbers(&tensor.shape);
        out.number(tensor.pieces.len() as u64);
        for piece in &tensor.pieces {
            // Both have the tensor's rank (checked when it was built).
            out.numbers(&piece.offsets);
            out.numbers(&piece.shape);
            out.location(&piece.location);
            out.number(piece.replicas.len() as u64);
            for replica in &piece.replicas {
                out.location(replica);
            }
        }
    }
    out.paths(&checkpoint.skipped_outputs);
    out.strings(&checkpoint.non_tensors);
    out.number(checkpoint.excluded.len() as u64);
    for (name, bytes) in &checkpoint.excluded {
        out.bytes(name.as_bytes());
        out.number(*bytes);
    }
    let inputs: Vec<PathBuf> = checkpoint.inputs.paths().map(Path::to_path_buf).collect();
    out.paths(&inputs);
    out.number(checkpoint.top_level_keys.len() as u64);
    for (name, key) in &checkpoint.top_level_keys {
        out.bytes(name.as_bytes());
        out.bytes(key.as_bytes());
    }
    out.strings(&checkpoint.notes);
    out.0
}

/// The checkpoint [`encode`] made of `bytes`, its inputs not opened by
/// this rank; what is wrong with them otherwise. The model is checked as
/// the readers check theirs: every tensor rebuilt by
/// [`tensor_from_pieces`] (each piece of the tensor's rank, inside its
/// shape, the pieces tiling it), every location naming one of the files,
/// names in order and once, so that a garbled payload is an error here and
/// not a wrong copy later.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let mut from = Reader { bytes, at: 0 };
    if from.take(MAGIC.len())? != MAGIC {
        return Err("it does not start as this version's encoding does".into());
    }
    let files = from.paths()?;
    let count = from.count(MIN_TENSOR_BYTES)?;
    let mut tensors: Vec<FullTensor> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = from.string()?;
        let dtype = Dtype::parse(&from.string()?).map_err(|e| format!("'{name}': {e:?}"))?;
        let shape = from.numbers()?;
        let count = from.count(MIN_PIECE_BYTES)?;
        // Replicas are sent inside their piece; tensor_from_pieces finds
        // them again as the readers do, each block after its first copy.
        let mut pieces = Vec::with_capacity(count);
        for _ in 0..count {
            let offsets = from.numbers()?;
            let piece_shape = from.numbers()?;
            let location = from.location(files.len())?;
            pieces.push(Piece::new(location, &offsets, &piece_shape));
            for _ in 0..from.count(MIN_LOCATION_BYTES)? {
                pieces.push(Piece::new(
                    from.location(files.len())?,
                    &offsets,
                    &piece_shape,
                ));
            }
        }
        if let Some(previous) = tensors.last().filter(|t| t.name >= name) {
            return Err(format!(
                "tensor '{name}' follows '{}': names must be sorted and listed once",
                previous.name
            ));
        }
        let spec = TensorSpec {
            name: &name,
            dtype,
            shape: Some(&shape),
            hints: &WIRE_HINTS,
        };
        tensors.push(tensor_from_pieces(&spec, pieces, &files).map_err(|e| e.to_string())?);
    }
    let skipped_outputs = from.paths()?;
    let non_tensors = from.strings()?;
    let count = from.count(2)?;
    let mut excluded = Vec::with_capacity(count);
    for _ in 0..count {
        excluded.push((from.string()?, from.number()?));
    }
    let inputs = Inputs::unopened(&from.paths()?);
    let mut top_level_keys = BTreeMap::new();
    for _ in 0..from.count(2)? {
        top_level_keys.insert(from.string()?, from.string()?);
    }
    let notes = from.strings()?;
    if from.at != bytes.len() {
        return Err(format!("{} bytes follow its end", bytes.len() - from.at));
    }
    Ok(Checkpoint {
        files,
        tensors,
        skipped_outputs,
        non_tensors,
        excluded,
        inputs,
        top_level_keys,
        notes,
    })
}

/// The fewest bytes a tensor takes: its name's and dtype name's lengths,
/// a two-letter dtype name, its shape's and its piece list's counts.
const MIN_TENSOR_BYTES: u64 = 6;
/// The fewest bytes a piece takes: two counts, a location, a count.
const MIN_PIECE_BYTES: u64 = 6;
/// The fewest bytes a location takes: shard, offset and flags.
const MIN_LOCATION_BYTES: u64 = 3;

/// What messages about a decoded model advise: it was read by another
/// rank, which checked it, so a fault is in the transfer or a bug.
const WIRE_HINTS: PieceHints = PieceHints {
    holder: "piece",
    corrupt: "the model another rank sent arrived garbled (a bug or a faulty transport); run again, or with --headers all",
    overlap: "the model another rank sent arrived garbled (a bug or a faulty transport); run again, or with --headers all",
    missing: "the model another rank sent arrived garbled (a bug or a faulty transport); run again, or with --headers all",
};

struct Writer(Vec<u8>);

impl Writer {
    fn number(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    fn numbers(&mut self, values: &[u64]) {
        self.number(values.len() as u64);
        for &value in values {
            self.number(value);
        }
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.number(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    fn strings(&mut self, strings: &[String]) {
        self.number(strings.len() as u64);
        for string in strings {
            self.bytes(string.as_bytes());
        }
    }

    fn paths(&mut self, paths: &[PathBuf]) {
        self.number(paths.len() as u64);
        for path in paths {
            self.bytes(path.as_os_str().as_bytes());
        }
    }

    /// Shard and offset, then the CRC-32 and the archive length, each
    /// present or not (a flag byte says which).
    fn location(&mut self, location: &Location) {
        self.number(location.shard as u64);
        self.number(location.offset);
        let flags =
            u8::from(location.crc32.is_some()) | u8::from(location.archive_len.is_some()) << 1;
        self.0.push(flags);
        if let Some(crc) = location.crc32 {
            self.number(u64::from(crc));
        }
        if let Some(len) = location.archive_len {
            self.number(len);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("it ends early, at byte {}", self.bytes.len()));
        };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn number(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("a number at byte {} runs over 64 bits", self.at))
    }

    /// A count of things that each take at least `min_bytes` bytes: never
    /// more than the bytes left allow, so that garbled input cannot ask for
    /// a huge buffer (every Vec made from a count is O(payload)).
    fn count(&mut self, min_bytes: u64) -> Result<usize, String> {
        let count = self.number()?;
        let left = (self.bytes.len() - self.at) as u64;
        if count > left / min_bytes {
            return Err(format!("it claims {count} items with {left} bytes left"));
        }
        Ok(count as usize)
    }

    fn numbers(&mut self) -> Result<Vec<u64>, String> {
        let count = self.count(1)?;
        (0..count).map(|_| self.number()).collect()
    }

    fn raw(&mut self) -> Result<&[u8], String> {
        let len = self.count(1)?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, String> {
        let at = self.at;
        String::from_utf8(self.raw()?.to_vec())
            .map_err(|_| format!("the name at byte {at} is not UTF-8"))
    }

    fn strings(&mut self) -> Result<Vec<String>, String> {
        let count = self.count(1)?;
        (0..count).map(|_| self.string()).collect()
    }

    fn paths(&mut self) -> Result<Vec<PathBuf>, String> {
        let count = self.count(1)?;
        (0..count)
            .map(|_| Ok(PathBuf::from(OsStr::from_bytes(self.raw()?))))
            .collect()
    }

    /// A location in one of `files` files.
    fn location(&mut self, files: usize) -> Result<Location, String> {
        let at = self.at;
        let shard = self.number()?;
        let shard = usize::try_from(shard)
            .ok()
            .filter(|&s| s < files)
            .ok_or_else(|| format!("the location at byte {at} names file #{shard} of {files}"))?;
        let offset = self.number()?;
        let flags = self.take(1)?[0];
        if flags > 3 {
            return Err(format!(
                "unknown location flags {flags} at byte {}",
                self.at - 1
            ));
        }
        let crc32 = match flags & 1 {
            0 => None,
            _ => Some(u32::try_from(self.number()?).map_err(|e| e.to_string())?),
        };
        let archive_len = match flags & 2 {
            0 => None,
            _ => Some(self.number()?),
        };
        Ok(Location {
            shard,
            offset,
            crc32,
            archive_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut latin1 = b"/ckpt/\xe9/__0_0.distcp".to_vec();
        let file = PathBuf::from(OsStr::from_bytes(&latin1));
        latin1.truncate(8);
        let metadata = PathBuf::from(OsStr::from_bytes(&latin1)).join(".metadata");
        let unlocated = Location {
            shard: 0,
            offset: 1 << 40,
            crc32: None,
            archive_len: Some(4242),
        };
        let located = Location {
            crc32: Some(0xdead_beef),
            ..Location::at(0, 17)
        };
        let mut replicated = Piece::new(located, &[0, 0], &[3, 4]);
        replicated.replicas.push(unlocated);
        Checkpoint {
            files: vec![file.clone()],
            tensors: vec![
                FullTensor {
                    name: "scalar".into(),
                    dtype: Dtype::F64,
                    shape: vec![],
                    pieces: vec![Piece::new(Location::at(0, u64::MAX), &[], &[])],
                },
                FullTensor {
                    name: "w".into(),
                    dtype: Dtype::BF16,
                    shape: vec![6, 4],
                    pieces: vec![replicated, Piece::new(unlocated, &[3, 0], &[3, 4])],
                },
            ],
            skipped_outputs: vec![],
            non_tensors: vec!["step".into()],
            excluded: vec![("optim.x".into(), u64::MAX)],
            inputs: Inputs::unopened(&[metadata, file]),
            top_level_keys: BTreeMap::from([("w".into(), "model".into())]),
            notes: vec!["note: tied".into()],
        }
    }

    fn as_json(checkpoint: &Checkpoint) -> String {
        // Paths that are not UTF-8 do not serialize; compare them apart.
        let mut copy = Checkpoint {
            files: vec![],
            inputs: Inputs::default(),
            tensors: checkpoint.tensors.clone(),
            skipped_outputs: checkpoint.skipped_outputs.clone(),
            non_tensors: checkpoint.non_tensors.clone(),
            excluded: checkpoint.excluded.clone(),
            top_level_keys: checkpoint.top_level_keys.clone(),
            notes: checkpoint.notes.clone(),
        };
        copy.skipped_outputs.clear();
        serde_json::to_string(&copy).unwrap()
    }

    #[test]
    fn a_checkpoint_survives_the_trip_with_paths_that_are_not_utf8() {
        let sent = sample();
        let bytes = encode(&sent);
        let got = decode(&bytes).unwrap();
        assert_eq!(as_json(&got), as_json(&sent));
        assert_eq!(got.files, sent.files);
        let paths = |c: &Checkpoint| c.inputs.paths().map(Path::to_path_buf).collect::<Vec<_>>();
        assert_eq!(paths(&got), paths(&sent));
        // Much smaller than JSON: about 20 bytes per row chunk.
        assert!(bytes.len() < as_json(&sent).len() / 2, "{}", bytes.len());
    }

    #[test]
    fn garbled_bytes_are_errors_not_panics() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).unwrap_err().contains("follow its end"));
        // A count claiming more than is left is refused before allocating.
        let mut huge = MAGIC.to_vec();
        huge.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode(&huge).unwrap_err().contains("claims"));
        for at in MAGIC.len()..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0xa5;
            let _ = decode(&flipped);
        }
    }

    /// The error decoding `sample()` changed by `edit` gives.
    fn decoding_fails(edit: impl FnOnce(&mut Checkpoint)) -> String {
        let mut checkpoint = sample();
        edit(&mut checkpoint);
        decode(&encode(&checkpoint)).unwrap_err()
    }

    #[test]
    fn counts_beyond_the_payload_are_refused_before_allocating() {
        // No files, then 2^60 tensors: refused, not a 2^60-element Vec.
        let mut huge = MAGIC.to_vec();
        huge.push(0);
        let mut writer = Writer(huge);
        writer.number(1 << 60);
        writer.0.extend([0; 64]);
        let err = decode(&writer.0).unwrap_err();
        assert!(
            err.contains("claims 1152921504606846976 items with 64 bytes left"),
            "{err}"
        );
        // 64 bytes hold at most 10 tensors of 6 bytes each.
        let mut writer = Writer(MAGIC.to_vec());
        writer.number(0);
        writer.number(11);
        writer.0.extend([0; 64]);
        assert!(decode(&writer.0).unwrap_err().contains("claims 11 items"));
    }

    #[test]
    fn a_model_the_readers_would_refuse_is_refused() {
        let err = decoding_fails(|c| c.tensors[1].pieces[1].offsets = vec![4, 0]);
        assert!(
            err.contains("tensor 'w': piece [4:7, 0:4] (in")
                && err.contains("lies outside the full shape [6, 4]"),
            "{err}"
        );
        let err = decoding_fails(|c| {
            c.tensors[1].pieces.pop();
        });
        assert!(
            err.contains("tensor 'w': no piece covers region [3:6, 0:4]"),
            "{err}"
        );
        let err = decoding_fails(|c| c.tensors[1].pieces[1].offsets = vec![2, 0]);
        assert!(
            err.contains("tensor 'w': pieces") && err.contains("overlap"),
            "{err}"
        );
        let err = decoding_fails(|c| c.tensors[1].pieces[1].offsets = vec![3]);
        assert!(err.contains("but the tensor has 2 dimension(s)"), "{err}");
        let err = decoding_fails(|c| c.tensors[0].pieces.clear());
        assert!(
            err.contains("tensor 'scalar': no piece covers region []"),
            "{err}"
        );
        let err = decoding_fails(|c| c.tensors[1].shape = vec![u64::MAX, 4]);
        assert!(err.contains("tensor 'w'"), "{err}");
        assert!(
            err.contains("the model another rank sent arrived garbled"),
            "{err}"
        );
    }

    #[test]
    fn locations_must_name_one_of_the_files() {
        let err = decoding_fails(|c| c.tensors[1].pieces[1].location.shard = 1);
        assert!(err.contains("names file #1 of 1"), "{err}");
        let err = decoding_fails(|c| c.tensors[1].pieces[0].replicas[0].shard = 7);
        assert!(err.contains("names file #7 of 1"), "{err}");
    }

    #[test]
    fn names_must_be_sorted_and_listed_once() {
        let err = decoding_fails(|c| c.tensors.swap(0, 1));
        assert!(err.contains("tensor 'scalar' follows 'w'"), "{err}");
        let err = decoding_fails(|c| c.tensors[1].name = "scalar".into());
        assert!(err.contains("tensor 'scalar' follows 'scalar'"), "{err}");
    }

    proptest::proptest! {
        /// Bytes of a real model changed anywhere, cut or extended: an
        /// error or a model that passes every check (so survives the trip
        /// again), never a panic.
        #[test]
        fn mutated_models_decode_to_errors_or_checked_models(
            edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..6),
            cut in proptest::option::of(0usize..4096),
        ) {
            let mut bytes = encode(&sample());
            for (at, value) in edits {
                let at = MAGIC.len() + at % (bytes.len() - MAGIC.len());
                bytes[at] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            if let Ok(got) = decode(&bytes) {
                let again = decode(&encode(&got)).unwrap();
                proptest::prop_assert_eq!(as_json(&again), as_json(&got));
                for piece in got.tensors.iter().flat_map(|t| &t.pieces) {
                    proptest::prop_assert!(piece.location.shard < got.files.len());
                }
            }
        }
    }
}
