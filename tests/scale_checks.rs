//! Issue 25's checks at scale, on threaded ranks (`comm::threads`):
//!
//! - where the ranks located their DCP chunks is compared where two ranks
//!   located the same chunk: one rank finding a chunk at another offset
//!   (its copy of the file differs inside) fails every rank, naming the
//!   file; a chunk one rank alone located is compared with nothing;
//! - the inputs' signatures (size, first and last 64 KiB) are divided
//!   among the ranks sharing a view of INPUT_DIR, each rank reading its
//!   share only, while every view still signs every input and differing
//!   views are named;
//! - a whole run on 2 ranks reads about half the identity bytes per rank
//!   that a run on 1 rank reads, and drops the pieces it does not read.

use st_consolidate_mpi::checkpoint::dcp;
use st_consolidate_mpi::checkpoint::dcp::locate::{Wanted, locate_pieces};
use st_consolidate_mpi::checkpoint::identity::{Inputs, content_signature, signature_bytes};
use st_consolidate_mpi::checkpoint::select::Selection;
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::comm::collectives::{agree, same_locations_everywhere, sign_inputs};
use st_consolidate_mpi::comm::threads::run_ranks;
use st_consolidate_mpi::messages::Silent;
use st_consolidate_mpi::plan::{self, Plan, PlanOptions};
use st_consolidate_mpi::run::{Config, run};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The DCP fixture planned for `ranks`, every chunk then located.
fn located_plan(ranks: usize) -> Plan {
    let dir = fixture("dcp-v215-w2/checkpoint");
    let checkpoint = dcp::read_checkpoint(&dir, &Selection::default(), false).unwrap();
    let mut plan = plan::make(checkpoint, &PlanOptions::default(), ranks).unwrap();
    let every: Vec<(usize, usize)> = (plan.tensors.iter().enumerate())
        .flat_map(|(t, tensor)| (0..tensor.pieces.len()).map(move |p| (t, p)))
        .collect();
    let Plan {
        tensors,
        saved_names,
        shards,
        ..
    } = &mut plan;
    let wanted = Wanted {
        names: saved_names,
        files: shards,
        pieces: &every,
    };
    locate_pieces(tensors, &wanted).unwrap();
    plan
}

/// The first piece of the first tensor that has one: (tensor, piece).
fn some_piece(plan: &Plan) -> (usize, usize) {
    let t = plan
        .tensors
        .iter()
        .position(|t| !t.pieces.is_empty())
        .unwrap();
    (t, 0)
}

/// Runs the location comparison on 2 threaded ranks, `change` applied to
/// each rank's plan first; each rank's outcome as text (`Ok` for success).
fn compare_on_two(change: impl Fn(usize, &mut Plan) + Sync) -> Vec<Result<(), String>> {
    run_ranks(2, |comm| {
        let mut plan = located_plan(2);
        change(comm.rank(), &mut plan);
        agree(comm, same_locations_everywhere(comm, &plan)).map_err(|e| e.to_string())
    })
    .into_iter()
    .map(|outcome| outcome.expect("no rank panics"))
    .collect()
}

#[test]
fn a_chunk_located_at_another_offset_on_one_rank_fails_every_rank() {
    let plan = located_plan(2);
    let (t, p) = some_piece(&plan);
    let location = plan.tensors[t].pieces[p].location;
    let file = plan.shards[location.shard].display().to_string();
    let name = plan.saved_names[t].clone();

    // Both ranks located every chunk at the same places: accepted.
    for outcome in compare_on_two(|_, _| {}) {
        assert_eq!(outcome, Ok(()));
    }

    // Rank 1's copy of the file holds that chunk 64 bytes further on.
    let outcomes = compare_on_two(|rank, plan| {
        if rank == 1 {
            plan.tensors[t].pieces[p].location.offset += 64;
        }
    });
    let expected = format!(
        "input {file} does not hold the same chunk archive on every rank: for tensor '{name}' (chunk {p}), rank 0 on "
    );
    for (rank, outcome) in outcomes.iter().enumerate() {
        let text = outcome.as_ref().unwrap_err();
        assert!(text.contains(&expected), "rank {rank}: {text}");
        assert!(
            text.contains(&format!("finds them at byte {}", location.offset))
                && text.contains(&format!("finds them at byte {}", location.offset + 64))
                && text.contains("make every node's copy identical"),
            "rank {rank}: {text}"
        );
    }
    // Every rank shows rank 0's message, once.
    assert!(outcomes[1].as_ref().unwrap_err().starts_with("rank 0 "));

    // Another stored CRC-32 for the same chunk is a difference too.
    let outcomes = compare_on_two(|rank, plan| {
        if rank == 1 {
            let crc = &mut plan.tensors[t].pieces[p].location.crc32;
            *crc = Some(crc.unwrap_or(0) ^ 1);
        }
    });
    for outcome in &outcomes {
        assert!(
            outcome.as_ref().unwrap_err().contains(&expected),
            "{outcome:?}"
        );
    }

    // A chunk that one rank alone located is compared with nothing: rank 1
    // did not read that tensor (its pieces dropped), rank 0 found it
    // wherever it did.
    let outcomes = compare_on_two(|rank, plan| match rank {
        0 => plan.tensors[t].pieces[p].location.offset += 64,
        _ => plan.tensors[t].pieces = Vec::new(),
    });
    for outcome in outcomes {
        assert_eq!(outcome, Ok(()));
    }
}

/// `count` files of different sizes (some longer than both signature
/// blocks) in a new folder.
fn inputs_folder(count: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = (0..count)
        .map(|i| {
            let path = dir.path().join(format!("__{i}_0.distcp"));
            let len = 1000 + i * 50_000;
            let bytes: Vec<u8> = (0..len).map(|j| ((i * 7 + j) % 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect();
    (dir, paths)
}

/// What each rank of `ranks` got from `sign_inputs`, rank `r` reading the
/// files of `dirs[r]`: (bytes read, rank 0's table, the comparison).
type Signed = (u64, Option<Vec<(u64, String)>>, Result<(), String>);

fn sign_on(ranks: usize, dirs: &[(PathBuf, Vec<PathBuf>)]) -> Vec<Signed> {
    run_ranks(ranks, |comm| {
        let (dir, paths) = &dirs[comm.rank()];
        let mut inputs = Inputs::unopened(paths);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let signed = sign_inputs(comm, &mut inputs, dir, &pool).unwrap();
        let compared = agree(comm, signed.compared).map_err(|e| e.to_string());
        (signed.bytes_read, signed.table, compared)
    })
    .into_iter()
    .map(|outcome| outcome.expect("no rank panics"))
    .collect()
}

#[test]
fn ranks_sharing_a_view_divide_the_signatures_and_every_view_signs_every_input() {
    let (a, paths) = inputs_folder(7);
    let expected: Vec<(u64, String)> = paths
        .iter()
        .map(|p| {
            let size = std::fs::metadata(p).unwrap().len();
            (size, content_signature(p).unwrap())
        })
        .collect();
    let all_bytes: u64 = expected
        .iter()
        .map(|(size, _)| signature_bytes(*size))
        .sum();
    assert!(
        all_bytes > 7 * 64 * 1024,
        "some files are longer than 128 KiB"
    );

    // One view (one folder), 3 ranks: each signs every third file, once.
    let same = vec![(a.path().to_owned(), paths.clone()); 3];
    let outcomes = sign_on(3, &same);
    for (rank, (bytes, table, compared)) in outcomes.iter().enumerate() {
        let share: u64 = (rank..7)
            .step_by(3)
            .map(|i| signature_bytes(expected[i].0))
            .sum();
        assert_eq!(*bytes, share, "rank {rank} reads its share only");
        assert_eq!(compared, &Ok(()));
        assert_eq!(table.is_some(), rank == 0);
    }
    assert_eq!(outcomes.iter().map(|o| o.0).sum::<u64>(), all_bytes);
    assert_eq!(outcomes[0].1.as_ref().unwrap(), &expected);

    // Two views (node-local copies, here two folders), 2 ranks each: each
    // view signs every input, divided among its ranks.
    let b = tempfile::tempdir().unwrap();
    let copy: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            let to = b.path().join(p.file_name().unwrap());
            std::fs::copy(p, &to).unwrap();
            to
        })
        .collect();
    let views = |second: &[PathBuf]| {
        vec![
            (a.path().to_owned(), paths.clone()),
            (a.path().to_owned(), paths.clone()),
            (b.path().to_owned(), second.to_vec()),
            (b.path().to_owned(), second.to_vec()),
        ]
    };
    let outcomes = sign_on(4, &views(&copy));
    for (rank, (_, _, compared)) in outcomes.iter().enumerate() {
        assert_eq!(compared, &Ok(()), "rank {rank}");
    }
    assert_eq!(outcomes[0].0 + outcomes[1].0, all_bytes);
    assert_eq!(outcomes[2].0 + outcomes[3].0, all_bytes);

    // The second view's copy of file 5 differs in its last byte: named,
    // with both ranks of that view, on every rank.
    let changed = &copy[5];
    let mut bytes = std::fs::read(changed).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(changed, bytes).unwrap();
    let outcomes = sign_on(4, &views(&copy));
    let needle = format!(
        "input {} does not hold the same bytes on every rank: rank 2 on ",
        paths[5].display()
    );
    for (rank, (_, _, compared)) in outcomes.iter().enumerate() {
        let text = compared.as_ref().unwrap_err();
        assert!(
            text.contains(&needle) && text.contains(", rank 3 on "),
            "rank {rank}: {text}"
        );
        assert!(!text.contains("rank 1 on "), "rank {rank}: {text}");
    }
}

/// Each rank's identity bytes read in a whole run of the DCP fixture on
/// `ranks` threaded ranks (from rank 0's report).
fn identity_bytes_per_rank(ranks: usize) -> Vec<u64> {
    let out = tempfile::tempdir().unwrap();
    let outcomes = run_ranks(ranks, |comm| {
        let mut config = Config::new(fixture("dcp-v215-w2/checkpoint"), out.path());
        config.progress_secs = 0.0;
        run(&config, comm, &Silent)
    });
    let summary = outcomes
        .into_iter()
        .next()
        .unwrap()
        .expect("no rank panics")
        .unwrap();
    let report = serde_json::to_value(summary.report.unwrap()).unwrap();
    report["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["identity_bytes_read"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_run_on_two_ranks_reads_about_half_the_identity_bytes_per_rank() {
    let dir = fixture("dcp-v215-w2/checkpoint");
    let files: Vec<u64> = ["__0_0.distcp", "__1_0.distcp"]
        .iter()
        .map(|name| signature_bytes(std::fs::metadata(dir.join(name)).unwrap().len()))
        .collect();
    let metadata = signature_bytes(std::fs::metadata(dir.join(".metadata")).unwrap().len());
    let one = identity_bytes_per_rank(1);
    // Signed before the plan (.metadata as the reader opened it, so only
    // the chunk files), and all three checked again before publishing.
    assert_eq!(
        one,
        vec![files[0] + files[1] + files[0] + files[1] + metadata]
    );
    let two = identity_bytes_per_rank(2);
    assert_eq!(two.len(), 2);
    // Inputs [.metadata, __0_0, __1_0]: rank 0 signs .metadata (opened by
    // the reader) and __1_0, rank 1 signs __0_0; each checks its own again
    // (and .metadata, which every rank read under --headers all).
    assert_eq!(two[0], 2 * files[1] + metadata, "{two:?}");
    assert_eq!(two[1], 2 * files[0] + metadata, "{two:?}");
    assert!(two.iter().all(|&b| b < one[0]), "{two:?} against {one:?}");
}
