//! Collectives built on the [`Communicator`]: agreeing on each phase's
//! outcome, checking that every rank planned the same, reads the same
//! input bytes and sees the same OUTPUT_DIR, sharing header reads, and
//! gathering results to rank 0.

use crate::checkpoint::format::{InputFormat, detect};
use crate::checkpoint::hf_shards::{
    self, HeaderReading, ShardSummary, list_shard_files, read_shards,
};
use crate::checkpoint::identity::Inputs;
use crate::checkpoint::{Checkpoint, ReadOptions, dcp, deepspeed, wire};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::exec::lock::{OutputLock, host_name, read_token};
use crate::failure::Failure;
use crate::plan::Plan;
use crate::report::RankReport;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Turns this rank's result into the job's ([`crate::failure`]): if any
/// rank failed, every rank returns an error. The lowest failing rank
/// returns its own and sends its [`Failure`] (rank, kind, message) to the
/// others, which return it as [`Error::PeerFailed`].
pub fn agree<T>(comm: &dyn Communicator, result: Result<T>) -> Result<T> {
    let Some(failed) = comm.lowest_failed(result.is_err())? else {
        return result;
    };
    let mine = match &result {
        Err(err) if failed == comm.rank() => Failure::of(failed, err).encode(),
        _ => Vec::new(),
    };
    let told = comm.broadcast(failed, &mine)?;
    if failed == comm.rank() {
        return result;
    }
    Err(Failure::decode(&told)?.into_peer_error())
}

/// Collective: every rank checks that all ranks built the same plan. Ranks
/// on different nodes list and read INPUT_DIR on their own; a stale
/// listing or a copy still in progress would otherwise have them write
/// different layouts into the same files.
pub fn same_plan_everywhere(comm: &dyn Communicator, plan: &Plan) -> Result<()> {
    let digests = comm.all_gather(&plan.fingerprint())?;
    match digests.iter().position(|d| d != &digests[0]) {
        None => Ok(()),
        Some(rank) => Err(Error::ranks_disagree(
            format!(
                "rank {rank} built a different plan from rank 0: the ranks see different shard files or headers"
            ),
            "make sure every node sees the same, complete INPUT_DIR (wait for copies to finish; on NFS, check attribute caching) and runs the same command",
        )),
    }
}

/// Collective: every rank signs each input file's contents (size and both
/// ends, see [`crate::checkpoint::identity::content_signature`]; for DCP, `.metadata` too) and all
/// compare with rank 0, so that node-local copies of INPUT_DIR whose
/// headers agree but whose data differ are refused before anything is
/// written. A rank that read the checkpoint itself uses the signatures it
/// took when it opened each file, before reading it; the others sign their
/// files now. Names the first file that differs and the ranks and hosts
/// that see it differently.
pub fn same_inputs_everywhere(
    comm: &dyn Communicator,
    inputs: &Inputs,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    use rayon::prelude::*;
    if comm.size() == 1 {
        return Ok(());
    }
    let signed = pool.install(|| {
        (0..inputs.len())
            .into_par_iter()
            .map(|i| inputs.signature(i))
            .collect::<Result<Vec<String>>>()
    });
    let signed = agree(comm, signed)?;
    let mine = serde_json::to_vec(&(host_name(), signed)).unwrap_or_default();
    let decoded: Vec<(String, Vec<String>)> = comm
        .all_gather(&mine)?
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).unwrap_or_default())
        .collect();
    let (host0, expected) = &decoded[0];
    let Some(file) = (0..inputs.len()).find(|&i| {
        decoded
            .iter()
            .any(|(_, sigs)| sigs.get(i) != expected.get(i))
    }) else {
        return Ok(());
    };
    let differing: Vec<String> = decoded
        .iter()
        .enumerate()
        .filter(|(_, (_, sigs))| sigs.get(file) != expected.get(file))
        .map(|(rank, (host, _))| format!("rank {rank} on {host}"))
        .collect();
    let path = inputs.paths().nth(file).unwrap_or(Path::new("?"));
    Err(Error::ranks_disagree(
        format!(
            "input {} does not hold the same bytes on every rank: {} read(s) different contents (size or first/last 64 KiB) from rank 0 on {host0}",
            path.display(),
            differing.join(", ")
        ),
        "every node must see the same, complete INPUT_DIR: recopy the node-local copies (or use a shared filesystem) and rerun; nothing was written",
    ))
}

/// Collective: every rank reads the lock token rank 0 wrote in OUTPUT_DIR
/// and all compare, so that a node-local OUTPUT_DIR (each node writing into
/// a folder of its own under the same path) is refused before any byte is
/// written. The ranks and hosts that do not see rank 0's folder are named.
pub fn same_output_dir(
    comm: &dyn Communicator,
    dir: &Path,
    lock: Option<&OutputLock>,
) -> Result<()> {
    let seen = match lock {
        Some(lock) => lock.token().to_vec(),
        None => read_token_patiently(dir),
    };
    let mine = serde_json::to_vec(&(host_name(), seen)).unwrap_or_default();
    let all = comm.all_gather(&mine)?;
    let decoded: Vec<(String, Vec<u8>)> = all
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).unwrap_or_default())
        .collect();
    let expected = &decoded[0].1;
    let blind: Vec<String> = decoded
        .iter()
        .enumerate()
        .filter(|(_, (_, token))| token != expected || token.is_empty())
        .map(|(rank, (host, _))| format!("rank {rank} on {host}"))
        .collect();
    if blind.is_empty() {
        return Ok(());
    }
    Err(Error::ranks_disagree(
        format!(
            "OUTPUT_DIR {} is not the same folder on every rank: {} do(es) not see the folder rank 0 on {} prepared",
            dir.display(),
            blind.join(", "),
            decoded[0].0
        ),
        "OUTPUT_DIR must be on a filesystem shared by every node (not node-local scratch such as /tmp); nothing was written",
    ))
}

/// Collective: every rank's host name, in rank order (where `--verify`
/// sends each file to be compared on another node). A name that does not
/// decode fails the job rather than pass for one host.
pub fn host_names(comm: &dyn Communicator) -> Result<Vec<String>> {
    comm.all_gather(host_name().as_bytes())?
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| {
            String::from_utf8(bytes).map_err(|e| {
                Error::ranks_disagree(
                    format!("rank {rank} sent a host name that is not UTF-8: {e}"),
                    "all ranks must run the same st-consolidate-mpi binary; nothing was written",
                )
            })
        })
        .collect()
}

/// The lock token in `dir`, waiting briefly for it to appear, since a shared
/// filesystem may show a new file on other nodes a moment later. Empty if it
/// never does.
fn read_token_patiently(dir: &Path) -> Vec<u8> {
    for attempt in 0..10 {
        match read_token(dir) {
            Ok(token) => return token,
            Err(_) if attempt < 9 => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => {}
        }
    }
    Vec::new()
}

/// Collective: the parsed headers of every shard file, on every rank, and
/// how many of them this rank read itself. With `--headers all` each rank
/// reads them all; with `shared` each reads every size-th file and the ranks
/// exchange what they validated.
pub fn read_shard_headers(
    input: &Path,
    headers: HeaderReading,
    comm: &dyn Communicator,
    pool: &rayon::ThreadPool,
) -> Result<(Vec<ShardSummary>, usize)> {
    let files = agree(comm, list_shard_files(input))?;
    let (rank, size) = (comm.rank(), comm.size());
    if headers == HeaderReading::All || size == 1 {
        let parsed = agree(comm, pool.install(|| read_shards(&files)))?;
        return Ok((parsed, files.len()));
    }
    let mine: Vec<PathBuf> = files.iter().skip(rank).step_by(size).cloned().collect();
    let encoded = pool.install(|| read_shards(&mine)).and_then(|parsed| {
        serde_json::to_vec(&parsed).map_err(|e| {
            Error::ranks_disagree(
                format!("cannot encode the headers read on rank {rank}: {e}"),
                "shard paths must be valid UTF-8 for --headers shared; use --headers all",
            )
        })
    });
    let encoded = agree(comm, encoded)?;
    let parts = comm.all_gather(&encoded)?;
    let garbled = |what: String| {
        Error::ranks_disagree(
            what,
            "all ranks must run the same st-consolidate-mpi binary",
        )
    };
    let decoded: Result<Vec<Vec<ShardSummary>>> = parts
        .iter()
        .map(|bytes| {
            serde_json::from_slice(bytes)
                .map_err(|e| garbled(format!("unreadable header summary: {e}")))
        })
        .collect();
    // File i was read by rank i % size, as its (i / size)-th file.
    let ordered = decoded.and_then(|per_rank| {
        let mut per_rank: Vec<_> = per_rank.into_iter().map(Vec::into_iter).collect();
        (0..files.len())
            .map(|i| {
                per_rank[i % size]
                    .next()
                    .ok_or_else(|| garbled("a rank sent fewer headers than it read".into()))
            })
            .collect::<Result<Vec<_>>>()
    });
    Ok((agree(comm, ordered)?, mine.len()))
}

/// Collective: gathers every rank's mismatch lines to rank 0, which fails
/// with all of them if there are any.
pub fn collect_mismatches(comm: &dyn Communicator, mine: &[String]) -> Result<()> {
    let payload = serde_json::to_vec(mine).unwrap_or_default();
    let Some(all) = comm.gather(&payload)? else {
        return Ok(());
    };
    let mut mismatches = Vec::new();
    for (rank, bytes) in all.iter().enumerate() {
        // An unreadable list must never pass for an empty one.
        let lines: Vec<String> = serde_json::from_slice(bytes).map_err(|e| {
            Error::ranks_disagree(
                format!("rank {rank} sent an unreadable verification result: {e}"),
                "all ranks must run the same st-consolidate-mpi binary; the output was not published",
            )
        })?;
        mismatches.extend(lines);
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch { mismatches })
    }
}

/// Collective: the element-wise sums over all ranks of `mine` (counts every
/// rank needs, such as the stored CRC-32s each rank's verification checked).
/// A count that cannot be decoded fails the job.
pub fn sum_over_ranks<const N: usize>(comm: &dyn Communicator, mine: [u64; N]) -> Result<[u64; N]> {
    let payload: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut sums = [0u64; N];
    for (rank, bytes) in comm.all_gather(&payload)?.iter().enumerate() {
        if bytes.len() != 8 * N {
            return Err(Error::ranks_disagree(
                format!(
                    "rank {rank} sent {} bytes of counts, not {}",
                    bytes.len(),
                    8 * N
                ),
                "all ranks must run the same st-consolidate-mpi binary",
            ));
        }
        for (sum, value) in sums.iter_mut().zip(bytes.chunks_exact(8)) {
            let value: [u8; 8] = value.try_into().unwrap_or_default();
            *sum = sum.saturating_add(u64::from_le_bytes(value));
        }
    }
    Ok(sums)
}

/// Collective: rank 0 receives every rank's report (the others `None`).
/// A report that cannot be decoded fails the job, never passes as empty.
pub fn gather_reports(
    comm: &dyn Communicator,
    mine: &RankReport,
) -> Result<Option<Vec<RankReport>>> {
    let payload = serde_json::to_vec(mine).unwrap_or_default();
    let Some(payloads) = comm.gather(&payload)? else {
        return Ok(None);
    };
    payloads
        .iter()
        .enumerate()
        .map(|(rank, bytes)| {
            serde_json::from_slice(bytes).map_err(|e| {
                Error::ranks_disagree(
                    format!("rank {rank} sent an unreadable report: {e}"),
                    "all ranks must run the same st-consolidate-mpi binary",
                )
            })
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// Collective: the checkpoint in `dir`, in whatever format it is, read the
/// same on every rank, its format, and how many input headers (shard headers, or the
/// `.metadata` file) this rank read itself. With `--headers shared`, HF
/// shards' headers are read a share per rank and exchanged, and a DCP
/// `.metadata` is read by rank 0 alone and the compact model
/// ([`wire`]: names, dtypes, shapes, each chunk's block and archive) sent
/// to all. No DCP chunk is located here, under either mode.
pub fn read_checkpoint(
    dir: &Path,
    options: &ReadOptions,
    comm: &dyn Communicator,
    pool: &rayon::ThreadPool,
) -> Result<(Checkpoint, InputFormat, usize)> {
    let format = agree(comm, detect(dir, options.format))?;
    let shared = options.headers == HeaderReading::Shared && comm.size() > 1;
    if format == InputFormat::HfShards {
        let (parsed, read) = read_shard_headers(dir, options.headers, comm, pool)?;
        let checkpoint = pool.install(|| {
            let mut checkpoint = hf_shards::checkpoint_from(
                dir,
                parsed,
                options.allow_missing_shard_files,
                options.source_ranks,
            )?;
            options.select.apply(&mut checkpoint);
            options.select.check_leaves_some(&checkpoint)?;
            Ok(checkpoint)
        });
        return Ok((agree(comm, checkpoint)?, format, read));
    }
    let reader = !shared || comm.rank() == 0;
    let mine = if reader {
        pool.install(|| {
            let checkpoint = match format {
                InputFormat::DeepSpeed => {
                    let read = deepspeed::DeepSpeedRead {
                        tag: options.tag.as_deref(),
                        keep_tied: options.keep_tied,
                        exclude_frozen: options.exclude_frozen,
                    };
                    deepspeed::read_checkpoint(dir, &read, &options.select)?
                }
                _ => dcp::read_checkpoint(dir, &options.select, options.plan_only)?,
            };
            options.select.check_leaves_some(&checkpoint)?;
            Ok(Some(checkpoint))
        })
    } else {
        Ok(None)
    };
    let mine = agree(comm, mine)?;
    if !shared {
        return Ok((mine.unwrap_or_default(), format, 1));
    }
    // The compact model, without any chunk located: each rank locates its
    // own once the plan says which (see `checkpoint::dcp::locate`).
    // Rank 0 keeps its own, with what each input was when it opened it.
    let payload = mine.as_ref().map(wire::encode).unwrap_or_default();
    let sent = comm.broadcast(0, &payload)?;
    drop(payload);
    let decoded = match mine {
        Some(checkpoint) => Ok(checkpoint),
        None => wire::decode(&sent).map_err(|e| {
            Error::ranks_disagree(
                format!("the checkpoint rank 0 sent cannot be read: {e}"),
                "all ranks must run the same st-consolidate-mpi binary",
            )
        }),
    };
    Ok((agree(comm, decoded)?, format, usize::from(reader)))
}
