//! Reading PyTorch DCP FileSystemWriter checkpoints without Python: real
//! checkpoints written by PyTorch 2.15 (two ranks, and one rank) and 2.5 are
//! read, every model tensor is reassembled from its pieces and compared by
//! sha256 with what PyTorch saved; damaged copies are refused by name.

use proptest::prelude::*;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use st_consolidate_mpi::Error;
use st_consolidate_mpi::checkpoint::FullTensor;
use st_consolidate_mpi::checkpoint::coverage as dcp;
use st_consolidate_mpi::checkpoint::dcp::archive::{ChunkRequest, locate_chunk_data};
use st_consolidate_mpi::checkpoint::dcp::metadata::parse_metadata;
use st_consolidate_mpi::checkpoint::dcp::pickle::{self, Limits};
use st_consolidate_mpi::checkpoint::dcp::{
    DcpCheckpoint, read_dcp_checkpoint, read_dcp_checkpoint_with,
};
use st_consolidate_mpi::safetensors::dtype::Dtype;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// A writable copy of a checkpoint directory.
fn copy_checkpoint(relative: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(relative)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    copy
}

/// The full tensor's bytes, placed element by element from its pieces.
fn reassemble(files: &[PathBuf], tensor: &FullTensor) -> Vec<u8> {
    let element = tensor.dtype.size() as usize;
    let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
    let total: usize = shape.iter().product();
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut full = vec![0u8; total * element];
    let mut filled = vec![false; total];
    for piece in &tensor.pieces {
        let sizes: Vec<usize> = piece.shape.iter().map(|&d| d as usize).collect();
        let count: usize = sizes.iter().product();
        let mut bytes = vec![0u8; count * element];
        let file = fs::File::open(&files[piece.location.shard]).unwrap();
        file.read_exact_at(&mut bytes, piece.location.offset)
            .unwrap();
        for local in 0..count {
            // Row-major position of `local` inside the piece, then in the tensor.
            let mut rest = local;
            let mut global = 0;
            for d in (0..sizes.len()).rev() {
                let index = rest % sizes[d];
                rest /= sizes[d];
                global += (piece.offsets[d] as usize + index) * strides[d];
            }
            assert!(!filled[global], "{}: element {global} twice", tensor.name);
            filled[global] = true;
            full[global * element..(global + 1) * element]
                .copy_from_slice(&bytes[local * element..(local + 1) * element]);
        }
    }
    assert!(
        filled.iter().all(|&f| f),
        "{}: elements missing",
        tensor.name
    );
    full
}

/// Checks every tensor of `manifest.json` against the checkpoint: dtype,
/// shape, and sha256 of the reassembled bytes.
fn check_manifest(checkpoint: &DcpCheckpoint, manifest: &Path) -> usize {
    let manifest: Json = serde_json::from_slice(&fs::read(manifest).unwrap()).unwrap();
    let manifest = manifest.as_object().unwrap();
    for (name, expected) in manifest {
        let tensor = checkpoint
            .tensors
            .iter()
            .find(|t| &t.name == name)
            .unwrap_or_else(|| panic!("{name} not read"));
        assert_eq!(tensor.dtype.name(), expected["dtype"], "{name}");
        let shape: Vec<u64> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(tensor.shape, shape, "{name}");
        let digest = Sha256::digest(reassemble(&checkpoint.files, tensor));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected["sha256"], "{name}");
    }
    manifest.len()
}

fn message(err: Error) -> String {
    err.to_string()
}

#[test]
fn two_rank_checkpoint_reassembles_to_pytorchs_bytes() {
    let dir = fixture("torch-dcpfs-w2/checkpoint");
    let checkpoint = read_dcp_checkpoint(&dir).unwrap();
    let checked = check_manifest(&checkpoint, &fixture("torch-dcpfs-w2/manifest.json"));
    assert_eq!(checked, 10);
    assert_eq!(
        checkpoint.non_tensors,
        ["step", "extra.note", "extra.epoch"]
    );
    assert!(checkpoint.unsupported.is_empty() && checkpoint.skipped.is_empty());
    let optimizer: Vec<&str> = checkpoint
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.starts_with("optim."))
        .collect();
    assert_eq!(optimizer.len(), 3);
    // Both ranks' files hold pieces, and uneven chunks are kept as saved.
    let files: std::collections::BTreeSet<&str> = checkpoint
        .tensors
        .iter()
        .flat_map(|t| t.pieces.iter().map(|p| &checkpoint.files[p.location.shard]))
        .map(|path| path.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        files.into_iter().collect::<Vec<_>>(),
        ["__0_0.distcp", "__1_0.distcp"]
    );
    let embed = &checkpoint.tensors[0];
    assert_eq!(embed.name, "model.embed_tokens.weight");
    let shapes: Vec<&[u64]> = embed.pieces.iter().map(|p| &p.shape[..]).collect();
    assert_eq!(shapes, [&[501, 64][..], &[500, 64][..]]);
}

#[test]
fn tensors_tile_their_shapes_and_every_input_is_listed() {
    let dir = fixture("torch-dcpfs-w2/checkpoint");
    let checkpoint = read_dcp_checkpoint(&dir).unwrap();
    let files = &checkpoint.files;
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|f| f.starts_with(&dir)));
    for tensor in &checkpoint.tensors {
        assert_eq!(dcp::check_coverage(&tensor.shape, &tensor.pieces), Ok(()));
        assert!(tensor.pieces.iter().all(|p| p.location.shard < files.len()));
    }
    // .metadata first, then every .distcp as it was opened.
    let inputs: Vec<&Path> = checkpoint.inputs.paths().collect();
    let mut expected = vec![dir.join(".metadata")];
    expected.extend(files.iter().cloned());
    assert_eq!(
        inputs,
        expected.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );
}

#[test]
fn only_kept_tensors_are_located() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    // With rank 0's file gone, a replicated tensor rank 1 saved still reads.
    fs::remove_file(dir.path().join("__0_0.distcp")).unwrap();
    let keep = |name: &str| name == "model.layers.0.mlp.up_proj.weight";
    let checkpoint = read_dcp_checkpoint_with(dir.path(), &keep).unwrap();
    assert_eq!(checkpoint.tensors.len(), 1);
    assert_eq!(checkpoint.skipped.len(), 12);
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    assert!(
        err.contains("__0_0.distcp") && err.contains("tensor '"),
        "{err}"
    );
}

fn single(version: &str) {
    let root = fixture(&format!("torch-dcpfs-single/{version}"));
    let dir = root.join("checkpoint");
    let keep = |name: &str| name != "w.transposed";
    let checkpoint = read_dcp_checkpoint_with(&dir, &keep).unwrap();
    let checked = check_manifest(&checkpoint, &root.join("manifest.json"));
    assert!(checked >= 6, "{checked}");
    assert_eq!(checkpoint.non_tensors, ["step"]);
    assert_eq!(checkpoint.skipped, ["w.transposed"]);
    // complex64 is safetensors' C64: read like any other tensor.
    assert!(checkpoint.unsupported.is_empty());
    let complex = checkpoint.tensors.iter().find(|t| t.name == "w.complex");
    assert_eq!(complex.map(|t| t.dtype), Some(Dtype::C64));

    // The transposed view was saved column-major: refused, not misread.
    let err = message(read_dcp_checkpoint(&dir).unwrap_err());
    for needle in [
        "w.transposed",
        "__0_0.distcp",
        "non-contiguous",
        ".contiguous()",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }

    // A chunk written through zstd is refused naming the tensor and file.
    let err = message(read_dcp_checkpoint_with(&root.join("transformed"), &keep).unwrap_err());
    for needle in ["w.bf16", "__0_0.distcp", "stream.zstd/1", "ZStandard"] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn pytorch_2_15_single_rank_dtypes_read_back() {
    // bf16 and int64 via _rebuild_tensor_v2, float8 and uint16 via
    // _rebuild_tensor_v3 with an UntypedStorage, an empty tensor.
    single("torch-2.15");
}

#[test]
fn pytorch_2_5_single_rank_dtypes_read_back() {
    single("torch-2.5");
}

#[test]
fn a_dtype_disagreeing_with_the_archive_is_refused() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    // The metadata's one float32 global (memoized for every F32 tensor)
    // becomes float16, the same length, so only the dtype changes.
    let path = dir.path().join(".metadata");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(7).position(|w| w == b"float32").unwrap();
    bytes[at..at + 7].copy_from_slice(b"float16");
    fs::write(&path, bytes).unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    for needle in [
        "model.layers.0.conv.weight",
        "__0_0.distcp",
        "torch.float32",
        ".metadata says F16",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn a_truncated_distcp_file_is_refused() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    let path = dir.path().join("__1_0.distcp");
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    for needle in [
        "__1_0.distcp",
        "tensor '",
        "past the end of the file",
        "truncated",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn a_compressed_zip_entry_is_refused() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    let path = dir.path().join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    // The first central directory record of archive/data/0 (the first
    // chunk, model.embed_tokens.weight's rows 0..501): method := deflate.
    let name = b"archive/data/0";
    let record = (0..bytes.len() - 46)
        .find(|&i| bytes[i..i + 4] == *b"PK\x01\x02" && bytes[i + 46..].starts_with(name))
        .unwrap();
    bytes[record + 10] = 8;
    fs::write(&path, bytes).unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    for needle in [
        "model.embed_tokens.weight",
        "__0_0.distcp",
        "archive/data/0",
        "compressed (deflate)",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

/// CRC-32 as zip computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_big_endian_chunk_is_refused() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    let path = dir.path().join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    // The first chunk's archive starts the file, so its offsets are the
    // file's. Rewrite its byteorder entry as "big", with a matching size and
    // CRC in the central directory record the reader trusts.
    let name = b"archive/byteorder";
    let record = (0..bytes.len() - 46)
        .find(|&i| bytes[i..i + 4] == *b"PK\x01\x02" && bytes[i + 46..].starts_with(name))
        .unwrap();
    let field = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let local = field(record + 42);
    let local_extra = u16::from_le_bytes([bytes[local + 28], bytes[local + 29]]) as usize;
    let data = local + 30 + name.len() + local_extra;
    assert_eq!(&bytes[data..data + 6], b"little");
    bytes[data..data + 3].copy_from_slice(b"big");
    bytes[record + 16..record + 20].copy_from_slice(&crc32(b"big").to_le_bytes());
    bytes[record + 20..record + 24].copy_from_slice(&3u32.to_le_bytes());
    bytes[record + 24..record + 28].copy_from_slice(&3u32.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    for needle in [
        "model.embed_tokens.weight",
        "__0_0.distcp",
        "byte order \"big\"",
        "little-endian",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn a_zip64_chunk_archive_is_located() {
    // model.norm.weight[0:2] of the w2 fixture, rewritten with ZIP64 local
    // headers after 100 bytes of other data (tests/fixtures/torch-dcpfs-zip64/make.py).
    let dir = fixture("torch-dcpfs-w2/checkpoint");
    let checkpoint = read_dcp_checkpoint(&dir).unwrap();
    let norm = checkpoint
        .tensors
        .iter()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    let piece = norm.pieces.iter().find(|p| p.offsets == [0]).unwrap();
    let mut expected = [0u8; 4];
    fs::File::open(&checkpoint.files[piece.location.shard])
        .unwrap()
        .read_exact_at(&mut expected, piece.location.offset)
        .unwrap();

    let path = fixture("torch-dcpfs-zip64/chunk.bin");
    let bytes = fs::read(&path).unwrap();
    let name = b"archive/data/0";
    let header = (0..bytes.len() - 30)
        .find(|&i| bytes[i..i + 4] == *b"PK\x03\x04" && bytes[i + 30..].starts_with(name))
        .unwrap();
    let extra = header + 30 + name.len();
    assert_eq!(bytes[extra..extra + 2], [1, 0], "no ZIP64 extra field");

    let file = fs::File::open(&path).unwrap();
    let len = bytes.len() as u64;
    let request = ChunkRequest {
        dtype: Dtype::BF16,
        sizes: &[2],
        offset: 100,
        length: len - 100,
    };
    let data = locate_chunk_data(&file, len, &request).unwrap();
    let at = data.offset as usize;
    assert_eq!(bytes[at..at + 4], expected);
    // The ZIP64 entry's CRC-32 is returned as stored.
    assert_eq!(data.crc32, crc32(&expected));
    // The same archive does not hold an F32 chunk.
    let wrong = ChunkRequest {
        dtype: Dtype::F32,
        ..request
    };
    let refusal = locate_chunk_data(&file, len, &wrong).unwrap_err();
    assert!(refusal.reason.contains("torch.bfloat16"), "{refusal:?}");
}

#[test]
fn a_metadata_that_would_run_code_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join(".metadata"),
        b"cos\nsystem\n(S'touch pwned'\ntR.",
    )
    .unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    for needle in [".metadata", "os.system", "do not load it"] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    assert!(!dir.path().join("pwned").exists());
}

#[test]
fn a_missing_metadata_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_dcp_checkpoint(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(message(err).contains(".metadata"));
}

#[test]
fn a_truncated_metadata_is_refused() {
    let dir = copy_checkpoint("torch-dcpfs-w2/checkpoint");
    let path = dir.path().join(".metadata");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = message(read_dcp_checkpoint(dir.path()).unwrap_err());
    assert!(
        err.contains(".metadata") && err.contains("truncated"),
        "{err}"
    );
}

fn real_metadata() -> Vec<u8> {
    fs::read(fixture("torch-dcpfs-w2/checkpoint/.metadata")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_metadata(&bytes);
        let _ = pickle::parse(&bytes, &Limits::DATA_PKL);
    }

    #[test]
    fn mutated_real_metadata_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = real_metadata();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let _ = parse_metadata(&bytes);
    }
}
