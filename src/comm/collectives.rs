//! Collectives built on the [`Communicator`]: agreeing on each phase's
//! outcome, checking that every rank planned the same, reads the same
//! input bytes and sees the same OUTPUT_DIR, sharing header reads, and
//! gathering results to rank 0.

use crate::checkpoint::format::{InputFormat, detect};
use crate::checkpoint::hf_shards::{
    self, HeaderReading, ShardSummary, list_shard_files, read_shards,
};
use crate::checkpoint::identity::{Inputs, view_of};
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

/// What [`sign_inputs`] gives a rank.
#[derive(Debug)]
pub struct SignedInputs {
    /// On rank 0: every input's size and content signature as rank 0's
    /// view of INPUT_DIR signed them, in the inputs' order (for the
    /// inputs' fingerprint). `None` on the other ranks.
    pub table: Option<Vec<(u64, String)>>,
    /// On rank 0: whether every view's signatures equal rank 0's view's,
    /// the error naming the first input that differs and the ranks and
    /// hosts that see it differently; `Ok` on the other ranks. The run
    /// agrees on it once the ranks have compared their plans.
    pub compared: Result<()>,
    /// Bytes this rank read to sign its share.
    pub bytes_read: u64,
}

/// Collective: the inputs' content signatures (size and both ends, see
/// [`crate::checkpoint::identity::content_signature`]; for DCP,
/// `.metadata` too), each input signed once per view of INPUT_DIR, and
/// every view's compared with rank 0's, so that node-local copies of
/// INPUT_DIR whose headers agree but whose data differ are refused before
/// anything is written.
///
/// A view is what [`view_of`] names (one kernel, mount namespace, root and
/// INPUT_DIR directory): ranks sharing one see the same files, so they
/// divide the inputs among them (input `i` to the `i % k`-th of its `k`
/// ranks) and each reads the ends of its share only; every view still
/// signs every input, and rank 0 compares them all. Ranks on one node read
/// 1/k of the inputs' ends each; on N nodes each file's ends are read
/// once per node. A rank that opened an input before signing it (the DCP
/// reader records identities) must still see that same file. The signed
/// inputs are what [`Inputs::check_unchanged`] checks again before
/// publishing, on each rank its share.
pub fn sign_inputs(
    comm: &dyn Communicator,
    inputs: &mut Inputs,
    input_dir: &Path,
    pool: &rayon::ThreadPool,
) -> Result<SignedInputs> {
    let host = host_name();
    let view =
        view_of(input_dir).unwrap_or_else(|| format!("process {} on {host}", std::process::id()));
    let garbled = |what: String| {
        Error::ranks_disagree(
            what,
            "all ranks must run the same st-consolidate-mpi binary",
        )
    };
    let mine = serde_json::to_vec(&(&host, &view)).unwrap_or_default();
    let ranks: Vec<(String, String)> = comm
        .all_gather(&mine)?
        .iter()
        .enumerate()
        .map(|(rank, bytes)| {
            serde_json::from_slice(bytes).map_err(|e| {
                garbled(format!(
                    "rank {rank} sent an unreadable view of INPUT_DIR: {e}"
                ))
            })
        })
        .collect::<Result<_>>()?;
    let groups = view_groups(&ranks);
    let rank = comm.rank();
    let share = share_of(&groups, rank, inputs.len());
    let (signed, bytes_read) = agree(comm, pool.install(|| inputs.sign_share(&share)))?;
    let payload = serde_json::to_vec(&(inputs.len(), &signed)).unwrap_or_default();
    drop(signed);
    let (table, compared) = match comm.gather(&payload)? {
        None => (Ok(None), Ok(())),
        Some(parts) => {
            let decoded: Vec<Decoded> = parts
                .iter()
                .enumerate()
                .map(|(rank, bytes)| decode_signatures(rank, bytes, inputs.len()))
                .collect();
            // Rank 0's view is the first: rank 0 is its first rank.
            let table = view_table(&groups[0], &decoded, inputs.len());
            let compared = match &table {
                Ok(expected) => compare_views(&groups, expected, &decoded, &ranks, inputs),
                Err(_) => Ok(()),
            };
            (table.map(Some), compared)
        }
    };
    Ok(SignedInputs {
        table: agree(comm, table)?,
        compared,
        bytes_read,
    })
}

/// What one rank signed: (size, signature) of each input of its share.
type Signatures = Vec<(u64, String)>;

/// A rank's [`Signatures`] as decoded, or why they could not be.
type Decoded = std::result::Result<Signatures, String>;

/// What rank `rank` sent [`sign_inputs`]: its signatures, if it lists
/// `count` inputs as rank 0 does; otherwise why not.
fn decode_signatures(
    rank: usize,
    bytes: &[u8],
    count: usize,
) -> std::result::Result<Signatures, String> {
    let (inputs, list): (usize, Signatures) = serde_json::from_slice(bytes)
        .map_err(|e| format!("rank {rank} sent unreadable input signatures: {e}"))?;
    if inputs != count {
        return Err(format!(
            "rank {rank} lists {inputs} input files, rank 0 {count}"
        ));
    }
    Ok(list)
}

/// The hint for signatures that do not fit together.
const SIGNATURES_HINT: &str = "all ranks must run the same st-consolidate-mpi binary, and every node must see the same, complete INPUT_DIR (wait for copies to finish; on NFS, check attribute caching); nothing was written";

/// A view's table of every input's (size, signature), rebuilt from what
/// its ranks (`group`) signed: input `i` by the `i % k`-th, as its
/// `i / k`-th.
fn view_table(group: &[usize], signed: &[Decoded], count: usize) -> Result<Signatures> {
    let k = group.len();
    (0..count)
        .map(|i| {
            let rank = group[i % k];
            let list = signed[rank]
                .as_ref()
                .map_err(|reason| Error::ranks_disagree(reason.clone(), SIGNATURES_HINT))?;
            list.get(i / k).cloned().ok_or_else(|| {
                Error::ranks_disagree(
                    format!("rank {rank} sent too few input signatures"),
                    SIGNATURES_HINT,
                )
            })
        })
        .collect()
}

/// Whether every view's table equals rank 0's (`expected`); otherwise an
/// error naming the first input that differs, every rank of the views that
/// see it differently and rank 0's host (or why a view's table could not
/// be rebuilt).
fn compare_views(
    groups: &[Vec<usize>],
    expected: &Signatures,
    signed: &[Decoded],
    ranks: &[(String, String)],
    inputs: &Inputs,
) -> Result<()> {
    let mut tables = Vec::with_capacity(groups.len());
    for group in groups {
        tables.push(view_table(group, signed, expected.len())?);
    }
    let Some(file) = (0..expected.len()).find(|&i| tables.iter().any(|t| t[i] != expected[i]))
    else {
        return Ok(());
    };
    let differing: Vec<String> = groups
        .iter()
        .zip(&tables)
        .filter(|(_, table)| table[file] != expected[file])
        .flat_map(|(group, _)| group.iter())
        .map(|&rank| format!("rank {rank} on {}", ranks[rank].0))
        .collect();
    let path = inputs.paths().nth(file).unwrap_or(Path::new("?"));
    Err(Error::ranks_disagree(
        format!(
            "input {} does not hold the same bytes on every rank: {} read(s) different contents (size or first/last 64 KiB) from rank 0 on {}",
            path.display(),
            differing.join(", "),
            ranks[0].0
        ),
        "every node must see the same, complete INPUT_DIR: recopy the node-local copies (or use a shared filesystem) and rerun; nothing was written",
    ))
}

/// The ranks of each view of INPUT_DIR, in the order of their lowest rank
/// (rank 0's first), each in rank order; `ranks` is each rank's (host,
/// view).
fn view_groups(ranks: &[(String, String)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (rank, (_, view)) in ranks.iter().enumerate() {
        match groups.iter_mut().find(|g| ranks[g[0]].1 == *view) {
            Some(group) => group.push(rank),
            None => groups.push(vec![rank]),
        }
    }
    groups
}

/// The inputs (of `count`) `rank` signs: every `k`-th from its place among
/// the `k` ranks of its view.
pub fn share_of(groups: &[Vec<usize>], rank: usize, count: usize) -> Vec<usize> {
    let Some(group) = groups.iter().find(|g| g.contains(&rank)) else {
        return Vec::new();
    };
    let place = group.iter().position(|&r| r == rank).unwrap_or(0);
    (place..count).step_by(group.len().max(1)).collect()
}

/// Collective: where each rank located its DCP chunks, compared where two
/// ranks located the same chunk (the plan fingerprint covers each chunk's
/// archive as `.metadata` gives it; where its bytes are inside it, each
/// rank finds for the chunks it reads, after the plan). Each rank sends
/// rank 0 its located chunks ([`dcp::locate::encode_located`], about 12
/// bytes a chunk); rank 0 merges the lists and fails, naming the file, the
/// tensor and both ranks, if two ranks found one chunk at different places
/// ([`dcp::locate::compare_located`]). The caller agrees on the outcome.
pub fn same_locations_everywhere(comm: &dyn Communicator, plan: &Plan) -> Result<()> {
    let mine = dcp::locate::encode_located(&plan.tensors);
    let payload = [host_name().as_bytes(), &[0], &mine].concat();
    drop(mine);
    let Some(parts) = comm.gather(&payload)? else {
        return Ok(());
    };
    drop(payload);
    let mut hosts = Vec::with_capacity(parts.len());
    let mut located = Vec::with_capacity(parts.len());
    for part in parts {
        let split = part.iter().position(|&b| b == 0).unwrap_or(part.len());
        hosts.push(String::from_utf8_lossy(&part[..split]).into_owned());
        located.push(part.get(split + 1..).unwrap_or_default().to_vec());
    }
    dcp::locate::compare_located(&located, &hosts, &plan.saved_names, &plan.shards)
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
