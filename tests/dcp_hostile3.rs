//! Hostile round 3 (issue 17) against the DCP reader: inputs replaced while
//! the run holds them, inputs that are not regular files, duplicate zip
//! entries, node-local copies whose `.metadata` differ, and bit rot that
//! only the chunks' stored CRC-32 can reveal.

mod common;

use common::*;
use st_consolidate_mpi::checkpoint::dcp::HOLD_AFTER_READ_VAR;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A writable copy of a fixture's checkpoint folder (`.metadata` included).
fn copy_checkpoint(name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name).join("checkpoint")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    copy
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Opens `fifo` for writing once `child` has opened it for reading (the
/// hook), polling the open without blocking so that a child that exits
/// before the hook fails the test instead of hanging it.
fn writer_once_held(fifo: &Path, child: &mut Child) -> fs::File {
    loop {
        let opened = fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(fifo);
        match opened {
            Ok(file) => return file,
            // ENXIO: no reader yet.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {}
            Err(e) => panic!("cannot open {}: {e}", fifo.display()),
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut text).unwrap();
            panic!("the run ended ({status}) before the hook:\n{text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs the binary (no launcher) on `input`, holds it at the hook after the
/// DCP reader has read everything, lets `change` alter the input, releases
/// it, and returns its exit code and stderr.
fn run_changing_input(input: &Path, out: &Path, change: impl FnOnce()) -> (Option<i32>, String) {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("hold");
    mkfifo(&fifo);
    let mut child = Command::new(BIN)
        .args(["-q", s(input), s(out)])
        .env(HOLD_AFTER_READ_VAR, &fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut writer = writer_once_held(&fifo, &mut child);
    change();
    writer.flush().unwrap();
    drop(writer);
    let done = child.wait_with_output().unwrap();
    (done.status.code(), stderr(&done))
}

/// Replaces `path` (by rename, as `cp` to a temporary name and `mv` do)
/// with `bytes`.
fn replace(path: &Path, bytes: &[u8]) {
    let new = path.with_extension("new");
    fs::write(&new, bytes).unwrap();
    fs::rename(&new, path).unwrap();
}

fn assert_refused_as_changed(code: Option<i32>, text: &str, file: &str, out: &Path) {
    assert_eq!(code, Some(1), "the run must fail:\n{text}");
    for needle in [file, "changed during the run", "nothing was published"] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(
        !names(out).iter().any(|n| n.starts_with("model")),
        "{:?}",
        names(out)
    );
}

#[test]
fn a_distcp_replaced_after_its_chunks_are_located_stops_the_run() {
    // Case 1: every archive shifted by 64 bytes, in a new file under the
    // old name, between locating the chunks and copying them.
    let input = copy_checkpoint("dcp-v215-w2");
    let out = tempfile::tempdir().unwrap();
    let distcp = input.path().join("__0_0.distcp");
    let (code, text) = run_changing_input(input.path(), out.path(), || {
        let mut shifted = vec![0u8; 64];
        shifted.extend(fs::read(&distcp).unwrap());
        replace(&distcp, &shifted);
    });
    assert_refused_as_changed(code, &text, "__0_0.distcp", out.path());
}

#[test]
fn a_distcp_rewritten_in_place_after_reading_stops_the_run() {
    // Same inode and size, other bytes: the modification time (and the
    // content signature) tell.
    let input = copy_checkpoint("dcp-v215-w2");
    let out = tempfile::tempdir().unwrap();
    let distcp = input.path().join("__1_0.distcp");
    let mtime = fs::metadata(&distcp).unwrap().modified().unwrap();
    let (code, text) = run_changing_input(input.path(), out.path(), || {
        let mut bytes = fs::read(&distcp).unwrap();
        bytes.rotate_right(64);
        let mut file = fs::OpenOptions::new().write(true).open(&distcp).unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_all().unwrap();
        // The old modification time back: only the contents differ.
        file.set_modified(mtime).unwrap();
    });
    assert_refused_as_changed(code, &text, "__1_0.distcp", out.path());
}

#[test]
fn a_metadata_replaced_after_reading_stops_the_run() {
    // Case 17: `.metadata` is an input like the others.
    let input = copy_checkpoint("dcp-v215-w2");
    let out = tempfile::tempdir().unwrap();
    let metadata = input.path().join(".metadata");
    let (code, text) = run_changing_input(input.path(), out.path(), || {
        replace(&metadata, &fs::read(&metadata).unwrap());
    });
    assert_refused_as_changed(code, &text, ".metadata", out.path());
}

/// A FIFO at `path`, with an end held open by the test (read and write, so
/// that no open of it ever blocks): a reader that ignores the file type then
/// fails on an empty file instead of hanging the test.
fn fifo_held_open(path: &Path) -> fs::File {
    mkfifo(path);
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn refused_on_0_and_2_ranks(input: &Path, extra: &[&str], needles: &[&str]) {
    for ranks in [0, 2] {
        let out = tempfile::tempdir().unwrap();
        let mut args = extra.to_vec();
        args.extend([s(input), s(out.path())]);
        assert_fails(ranks, &args, input, out.path(), needles);
    }
}

#[test]
fn a_distcp_that_is_a_fifo_or_a_link_to_one_is_refused() {
    // Case 2.
    let input = copy_checkpoint("dcp-v215-w2");
    let distcp = input.path().join("__1_0.distcp");
    fs::remove_file(&distcp).unwrap();
    let _held = fifo_held_open(&distcp);
    let needles = [
        "__1_0.distcp",
        "is not a regular file: it is a named pipe (FIFO)",
    ];
    refused_on_0_and_2_ranks(input.path(), &[], &needles);

    let input = copy_checkpoint("dcp-v215-w2");
    let elsewhere = tempfile::tempdir().unwrap();
    let fifo = elsewhere.path().join("pipe");
    let _held = fifo_held_open(&fifo);
    let distcp = input.path().join("__0_0.distcp");
    fs::remove_file(&distcp).unwrap();
    std::os::unix::fs::symlink(&fifo, &distcp).unwrap();
    let needles = [
        "__0_0.distcp",
        "is not a regular file: it is a named pipe (FIFO)",
    ];
    refused_on_0_and_2_ranks(input.path(), &[], &needles);
}

#[test]
fn a_metadata_that_is_a_fifo_or_a_link_to_one_is_refused() {
    // Case 2: found as a DCP checkpoint, then refused by name.
    let input = copy_checkpoint("dcp-v215-w2");
    let metadata = input.path().join(".metadata");
    fs::remove_file(&metadata).unwrap();
    let held = fifo_held_open(&metadata);
    let needles = [
        ".metadata",
        "is not a regular file: it is a named pipe (FIFO)",
    ];
    refused_on_0_and_2_ranks(input.path(), &[], &needles);
    drop(held);
    // A link to a FIFO, with --input-format dcp and no end held open: a
    // blocking open would wait for ever for a writer.
    fs::remove_file(&metadata).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let fifo = elsewhere.path().join("pipe");
    mkfifo(&fifo);
    std::os::unix::fs::symlink(&fifo, &metadata).unwrap();
    refused_on_0_and_2_ranks(input.path(), &["--input-format", "dcp"], &needles);
}

/// Offsets of the central directory records of `path` whose name is `name`.
fn central_records(bytes: &[u8], name: &[u8]) -> Vec<usize> {
    (0..bytes.len() - 46)
        .filter(|&i| bytes[i..i + 4] == *b"PK\x01\x02" && bytes[i + 46..].starts_with(name))
        .filter(|&i| u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize == name.len())
        .collect()
}

#[test]
fn a_chunk_archive_naming_an_entry_twice_is_refused() {
    // Case 3: the first chunk archive's `archive/version` record renamed
    // `archive/data/0` (its 15th byte kept as a record comment, so the
    // directory's layout is unchanged) and pointed at the real data entry,
    // size and CRC included: two entries of one name, both readable.
    let input = copy_checkpoint("dcp-v215-w2");
    let path = input.path().join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    let data = central_records(&bytes, b"archive/data/0")[0];
    let version = *central_records(&bytes, b"archive/version")
        .iter()
        .find(|&&v| v > data)
        .unwrap();
    let (crc_sizes, local) = (16..28, 42..46);
    let copied: Vec<u8> = bytes[data + crc_sizes.start..data + crc_sizes.end].to_vec();
    bytes[version + crc_sizes.start..version + crc_sizes.end].copy_from_slice(&copied);
    let copied: Vec<u8> = bytes[data + local.start..data + local.end].to_vec();
    bytes[version + local.start..version + local.end].copy_from_slice(&copied);
    bytes[version + 28..version + 30].copy_from_slice(&14u16.to_le_bytes());
    bytes[version + 32..version + 34].copy_from_slice(&1u16.to_le_bytes());
    bytes[version + 46..version + 60].copy_from_slice(b"archive/data/0");
    fs::write(&path, bytes).unwrap();
    refused_on_0_and_2_ranks(
        input.path(),
        &[],
        &[
            "__0_0.distcp",
            "tensor '",
            "holds two entries named archive/data/0",
        ],
    );
}

/// Runs `mpirun -n 2` on `input`, rank 1 in a mount namespace of its own
/// where `alternative` is bind-mounted over `input`: two nodes with
/// node-local copies of INPUT_DIR under one path. Needs root (as CI has).
fn run_with_node_local_copies(input: &Path, alternative: &Path, out: &Path) -> (i32, String) {
    let script = r#"bin=$0 alt=$1 in=$2 out=$3
if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then
    exec unshare --mount sh -c 'mount --bind "$1" "$2" && exec "$0" -q "$2" "$3"' "$bin" "$alt" "$in" "$out"
fi
exec "$bin" -q "$in" "$out""#;
    let run = Command::new("mpirun")
        .args(["--oversubscribe", "-n", "2", "sh", "-c", script, BIN])
        .args([alternative, input, out])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    (run.status.code().unwrap_or(-1), stderr(&run))
}

#[test]
fn node_local_copies_whose_metadata_differ_are_refused() {
    // Case 17: rank 1's copy differs only in the checkpoint id recorded in
    // `.metadata` (same length, same tensors, same chunks): its bytes
    // differ, so the ranks do not read the same checkpoint.
    let input = copy_checkpoint("dcp-v215-w2");
    let alternative = copy_checkpoint("dcp-v215-w2");
    let path = alternative.path().join(".metadata");
    let mut bytes = fs::read(&path).unwrap();
    let id = b"\x8c\x0acheckpoint";
    let at = bytes.windows(id.len()).position(|w| w == id).unwrap();
    bytes[at + id.len() - 1] = b'T';
    fs::write(&path, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (code, text) = run_with_node_local_copies(input.path(), alternative.path(), out.path());
    assert_eq!(code, 1, "{text}");
    let needle = format!(
        "input {} does not hold the same bytes on every rank: rank 1",
        input.path().join(".metadata").display()
    );
    assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert!(names(out.path()).is_empty(), "{:?}", names(out.path()));

    // The same copy on both: accepted (the bind mount alone changes nothing).
    let (code, text) = run_with_node_local_copies(input.path(), input.path(), out.path());
    assert_eq!(code, 0, "{text}");
}

#[test]
fn the_plan_fingerprint_covers_where_every_piece_is() {
    // Case 17: two readings that agree on every header but not on where a
    // chunk's bytes are must not pass as the same plan.
    use st_consolidate_mpi::checkpoint::dcp;
    use st_consolidate_mpi::checkpoint::select::Selection;
    use st_consolidate_mpi::plan::{self, PlanOptions};
    let dir = fixture("dcp-v215-w2/checkpoint");
    let read = || dcp::read_checkpoint(&dir, &Selection::default(), false).unwrap();
    let options = PlanOptions::default();
    let same = plan::make(read(), &options, 2).unwrap();
    let again = plan::make(read(), &options, 2).unwrap();
    assert_eq!(same.fingerprint(), again.fingerprint());
    // Two chunks of one tensor with the same shape swap their bytes.
    let mut swapped = read();
    let tensor = swapped
        .tensors
        .iter_mut()
        .find(|t| t.pieces.len() >= 2 && t.pieces[0].shape == t.pieces[1].shape)
        .unwrap();
    let (a, b) = (tensor.pieces[0].location, tensor.pieces[1].location);
    tensor.pieces[0].location = b;
    tensor.pieces[1].location = a;
    let swapped = plan::make(swapped, &options, 2).unwrap();
    let headers = |p: &plan::Plan| p.files.iter().map(|f| f.header.clone()).collect::<Vec<_>>();
    assert_eq!(headers(&swapped), headers(&same));
    assert_ne!(swapped.fingerprint(), same.fingerprint());
    // One piece's offset alone.
    let mut moved = read();
    moved.tensors[0].pieces[0].location.offset += 64;
    let moved = plan::make(moved, &options, 2).unwrap();
    assert_ne!(moved.fingerprint(), same.fingerprint());
}

/// A copy of the w2 fixture with one byte flipped inside the data of a
/// chunk in `__0_0.distcp`: the tensor, the chunk's region, its bytes'
/// length, and its CRC-32 before the flip.
struct Rotten {
    input: tempfile::TempDir,
    tensor: String,
    chunk: String,
    len: u64,
    crc: u32,
}

fn rotten_chunk() -> Rotten {
    use st_consolidate_mpi::checkpoint::coverage::region;
    use st_consolidate_mpi::checkpoint::dcp::read_dcp_checkpoint;
    let input = copy_checkpoint("dcp-v215-w2");
    let read = read_dcp_checkpoint(input.path()).unwrap();
    let (tensor, piece) = read
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with("optim."))
        .flat_map(|t| t.pieces.iter().map(move |p| (t, p)))
        .find(|(_, p)| {
            read.files[p.location.shard].ends_with("__0_0.distcp")
                && p.shape.iter().product::<u64>() > 4
        })
        .unwrap();
    let len = piece.shape.iter().product::<u64>() * tensor.dtype.size();
    let path = input.path().join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    let at = piece.location.offset as usize;
    let crc = crc32fast::hash(&bytes[at..at + len as usize]);
    assert_eq!(
        piece.location.crc32,
        Some(crc),
        "torch.save stores the CRC-32"
    );
    bytes[at + 3] ^= 0x10;
    fs::write(&path, bytes).unwrap();
    Rotten {
        input,
        tensor: tensor.name.clone(),
        chunk: region(&piece.offsets, &piece.shape),
        len,
        crc,
    }
}

/// Non-empty chunks of the w2 fixture's model tensors.
fn model_chunks() -> usize {
    use st_consolidate_mpi::checkpoint::dcp::read_dcp_checkpoint;
    let read = read_dcp_checkpoint(&fixture("dcp-v215-w2/checkpoint")).unwrap();
    read.tensors
        .iter()
        .filter(|t| !t.name.starts_with("optim."))
        .flat_map(|t| &t.pieces)
        .filter(|p| p.shape.iter().product::<u64>() > 0)
        .count()
}

#[test]
fn verify_checks_each_chunk_against_its_stored_crc() {
    // Case 4: the copy reproduces the flipped byte, so comparing the output
    // with the input finds nothing; the chunk's stored CRC-32 does.
    let rotten = rotten_chunk();
    let input = rotten.input.path();
    let tensor = format!("'{}'", rotten.tensor);
    let needles = [
        tensor.as_str(),
        &rotten.chunk,
        "__0_0.distcp",
        "stored in its zip entry",
        "the input is damaged",
    ];
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    assert_fails(
        2,
        &["--exclude", "optim.*", "--verify", s(input), s(&out)],
        input,
        &out,
        &needles,
    );
    // Without --verify nothing checks the CRC: the copy is as it was.
    consolidate_ok(0, &["-q", "--exclude", "optim.*", s(input), s(&out)]);
    for ranks in [0, 2] {
        let run = consolidate(
            ranks,
            &["--exclude", "optim.*", "--verify-only", s(input), s(&out)],
        );
        let text = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{text}");
        for needle in needles {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
    // The intact checkpoint passes, and the summary counts the chunks.
    let good = fixture("dcp-v215-w2/checkpoint");
    let counted = format!(
        "{} DCP chunk(s) match the CRC-32 stored with them",
        model_chunks()
    );
    let fresh = work.path().join("fresh");
    let run = consolidate_ok(
        2,
        &["--exclude", "optim.*", "--verify", s(&good), s(&fresh)],
    );
    let text = stderr(&run);
    assert!(
        text.contains(&format!(
            "verified: every written byte equals the inputs; {counted}"
        )),
        "{text}"
    );
    let run = consolidate_ok(
        2,
        &["--exclude", "optim.*", "--verify-only", s(&good), s(&fresh)],
    );
    assert!(stderr(&run).contains(&counted), "{}", stderr(&run));
}

#[test]
fn a_chunk_without_a_recorded_crc_is_skipped_and_counted() {
    // A stored CRC-32 of 0 means "not recorded"
    // (torch.serialization.set_crc32_options(False)): the damaged chunk is
    // then not checked against one, and the summary says so.
    let rotten = rotten_chunk();
    let path = rotten.input.path().join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    let records: Vec<usize> = central_records(&bytes, b"archive/data/0")
        .into_iter()
        .filter(|&r| {
            bytes[r + 16..r + 20] == rotten.crc.to_le_bytes()
                && bytes[r + 24..r + 28] == (rotten.len as u32).to_le_bytes()
        })
        .collect();
    assert_eq!(records.len(), 1, "the chunk's central record");
    bytes[records[0] + 16..records[0] + 20].copy_from_slice(&[0; 4]);
    fs::write(&path, bytes).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let input = s(rotten.input.path());
    let run = consolidate_ok(2, &["--exclude", "optim.*", "--verify", input, s(&out)]);
    let text = stderr(&run);
    let summary = format!(
        "{} DCP chunk(s) match the CRC-32 stored with them, 1 carry none",
        model_chunks() - 1
    );
    assert!(text.contains(&summary), "missing {summary:?} in:\n{text}");
}
