//! Each rank locates only the DCP chunks it copies (issue 20): on 2 ranks,
//! under `--headers all` and `--headers shared`, each rank's count of
//! chunks located (in `--report` and `-v`) is a share of the total, the
//! shares add up to it, and the output is still every tensor PyTorch saved,
//! bit for bit.

mod common;

use common::*;
use serde_json::Value as Json;
use st_consolidate_mpi::checkpoint::dcp::read_dcp_checkpoint_with;
use std::fs;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Chunk copies of the model tensors (not `optim.*`): what a run that
/// copies everything locates.
fn model_chunks(name: &str) -> u64 {
    chunks_where(name, |_| true)
}

/// [`model_chunks`] of the pieces `counted` accepts (by shape).
fn chunks_where(name: &str, counted: impl Fn(&[u64]) -> bool) -> u64 {
    let keep = |tensor: &str| !tensor.starts_with("optim.");
    let checkpoint = read_dcp_checkpoint_with(&fixture(name).join("checkpoint"), &keep).unwrap();
    let pieces = checkpoint.tensors.iter().flat_map(|t| &t.pieces);
    pieces
        .filter(|p| counted(&p.shape))
        .map(|p| 1 + p.replicas.len() as u64)
        .sum()
}

/// Runs `ranks` ranks with `extra` options and small output files (many of
/// them), checks the output against the fixture's manifest, and returns
/// each rank's (chunks located, archive bytes read) from the report, and
/// stderr.
fn located_per_rank(name: &str, ranks: usize, extra: &[&str]) -> (Vec<(u64, u64)>, String) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let report = work.path().join("report.json");
    let input = fixture(name).join("checkpoint");
    let mut args = vec![
        "-v",
        "--progress",
        "0",
        "--exclude",
        "optim.*",
        "--max-shard-size",
        "8KB",
        "--report",
        s(&report),
    ];
    args.extend(extra);
    args.extend([s(&input), s(&out)]);
    let run = consolidate_ok(ranks, &args);
    assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
    let report: Json = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    let files = report["outputs"].as_array().unwrap().len();
    assert!(files >= 4, "{name}: only {files} output files");
    let counts = report["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let count = |key: &str| r[key].as_u64().unwrap();
            (count("chunks_located"), count("archive_bytes_read"))
        })
        .collect();
    (counts, stderr(&run))
}

#[test]
fn each_of_two_ranks_locates_about_half_the_chunks_under_both_header_modes() {
    for name in ["dcp-v215-w4-mesh", "dcp-v25-w2"] {
        let total = model_chunks(name);
        // One rank copies everything: it locates every chunk.
        let (alone, _) = located_per_rank(name, 0, &[]);
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].0, total, "{name}");
        for headers in ["all", "shared"] {
            let (counts, text) = located_per_rank(name, 2, &["--headers", headers]);
            assert_eq!(counts.len(), 2, "{name} {headers}");
            let sum: u64 = counts.iter().map(|c| c.0).sum();
            assert_eq!(sum, total, "{name} {headers}: {counts:?}");
            let bytes: u64 = counts.iter().map(|c| c.1).sum();
            assert!(
                bytes <= alone[0].1,
                "{name} {headers}: {counts:?} {alone:?}"
            );
            for (rank, &(chunks, bytes)) in counts.iter().enumerate() {
                // About half: neither none nor all, nor most of them.
                assert!(
                    chunks > 0 && chunks < total && chunks * 5 >= total,
                    "{name} {headers}: rank {rank} located {chunks} of {total}"
                );
                assert!(bytes > 0, "{name} {headers}: rank {rank}");
                let line = format!("rank {rank} on ");
                let said = text.lines().any(|l| {
                    l.contains(&line) && l.contains(&format!("located {chunks} chunk(s)"))
                });
                assert!(
                    said,
                    "{name} {headers}: no -v line for rank {rank}:\n{text}"
                );
            }
        }
    }
}

#[test]
fn under_the_balanced_schedule_each_rank_locates_its_range() {
    let name = "dcp-v215-w4-mesh";
    let total = model_chunks(name);
    for headers in ["all", "shared"] {
        let extra = ["--schedule", "balanced", "--headers", headers];
        let (counts, _) = located_per_rank(name, 2, &extra);
        // A chunk whose bytes straddle the ranks' boundary is located by both.
        let sum: u64 = counts.iter().map(|c| c.0).sum();
        assert!(
            sum >= total && sum < total + 8,
            "{headers}: {counts:?} of {total}"
        );
        for &(chunks, _) in &counts {
            assert!(
                chunks > 0 && chunks < total,
                "{headers}: {counts:?} of {total}"
            );
        }
    }
}

#[test]
fn verify_and_verify_only_locate_what_each_rank_compares() {
    let name = "dcp-v25-w2";
    let total = model_chunks(name);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let input = fixture(name).join("checkpoint");
    let args = [
        "--verify",
        "--exclude",
        "optim.*",
        "--max-shard-size",
        "8KB",
        s(&input),
        s(&out),
    ];
    let run = consolidate_ok(2, &args);
    assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
    // The CRC-32 count is the job's, not rank 0's share (empty chunks hold
    // nothing to check).
    let with_bytes = chunks_where(name, |shape| !shape.contains(&0));
    assert!(with_bytes < total);
    let crcs = format!("; {with_bytes} DCP chunk(s) match the CRC-32");
    let text = stderr(&run);
    assert!(text.contains(&crcs), "{crcs}:\n{text}");
    let verify_only = [
        "--verify-only",
        "-v",
        "--exclude",
        "optim.*",
        "--max-shard-size",
        "8KB",
        s(&input),
        s(&out),
    ];
    let text = stderr(&consolidate_ok(2, &verify_only));
    assert!(text.contains(&crcs), "{crcs}:\n{text}");
    let located: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split("located ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(located.len(), 2, "{text}");
    assert_eq!(located.iter().sum::<u64>(), total, "{text}");
    assert!(located.iter().all(|&n| n > 0 && n < total), "{located:?}");
}

#[test]
fn the_reader_locates_nothing_and_locating_is_done_once_per_piece() {
    use st_consolidate_mpi::checkpoint::dcp::locate::{Wanted, locate_pieces};
    use st_consolidate_mpi::checkpoint::dcp::read_checkpoint;
    use st_consolidate_mpi::checkpoint::select::Selection;
    let dir = fixture("dcp-v215-w2").join("checkpoint");
    let mut checkpoint = read_checkpoint(&dir, &Selection::default(), false).unwrap();
    let all = |c: &st_consolidate_mpi::checkpoint::Checkpoint| {
        c.tensors
            .iter()
            .flat_map(|t| &t.pieces)
            .map(|p| p.location)
            .collect::<Vec<_>>()
    };
    assert!(all(&checkpoint).iter().all(|l| !l.is_located()));
    let names: Vec<String> = checkpoint.tensors.iter().map(|t| t.name.clone()).collect();
    // Every piece of the first tensor, asked for twice.
    let first: Vec<(usize, usize)> = (0..checkpoint.tensors[0].pieces.len())
        .map(|p| (0, p))
        .collect();
    let twice: Vec<(usize, usize)> = first.iter().chain(&first).copied().collect();
    let wanted = Wanted {
        names: &names,
        files: &checkpoint.files,
        pieces: &twice,
    };
    let files = checkpoint.files.clone();
    let cost = locate_pieces(&mut checkpoint.tensors, &wanted).unwrap();
    assert_eq!(cost.chunks, first.len() as u64);
    assert!(cost.archive_bytes > 0);
    let located = all(&checkpoint).iter().filter(|l| l.is_located()).count();
    assert_eq!(located, first.len());
    // Already located: nothing is read again.
    let wanted = Wanted {
        names: &names,
        files: &files,
        pieces: &first,
    };
    assert_eq!(
        locate_pieces(&mut checkpoint.tensors, &wanted)
            .unwrap()
            .chunks,
        0
    );
    // What the library's full reading finds, piece for piece.
    let full = read_dcp_checkpoint_with(&dir, &|_| true).unwrap();
    let expected = full.tensors.iter().find(|t| t.name == names[0]).unwrap();
    assert_eq!(checkpoint.tensors[0].pieces, expected.pieces);
}

#[test]
fn a_bad_archive_fails_every_rank_with_one_message_whichever_rank_copies_it() {
    use st_consolidate_mpi::checkpoint::dcp::read_checkpoint;
    use st_consolidate_mpi::checkpoint::select::Selection;
    let name = "dcp-v215-w2";
    let input = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name).join("checkpoint")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), input.path().join(entry.file_name())).unwrap();
    }
    // The last model tensor's first chunk: its archive's end (the zip's
    // end of central directory) zeroed.
    let checkpoint = read_checkpoint(input.path(), &Selection::default(), true).unwrap();
    let tensor = checkpoint
        .tensors
        .iter()
        .rfind(|t| !t.name.starts_with("optim.") && t.pieces[0].location.archive_len > Some(64))
        .unwrap();
    let location = tensor.pieces[0].location;
    let path = &checkpoint.files[location.shard];
    let mut bytes = fs::read(path).unwrap();
    let end = (location.offset + location.archive_len.unwrap()) as usize;
    bytes[end - 22..end].fill(0);
    fs::write(path, bytes).unwrap();
    let file = path.file_name().unwrap().to_str().unwrap().to_owned();
    let quoted = format!("tensor '{}'", tensor.name);
    let needles = [
        file.as_str(),
        quoted.as_str(),
        "is not a torch.save zip archive",
    ];
    for ranks in [0, 2, 3] {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        let args = [
            "--exclude",
            "optim.*",
            "--max-shard-size",
            "8KB",
            s(input.path()),
            s(&out),
        ];
        assert_fails(ranks, &args, input.path(), &out, &needles);
        assert!(names(&out).is_empty(), "{ranks}: {:?}", names(&out));
    }
}
