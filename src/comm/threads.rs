//! [`ThreadWorld`]: a job of N ranks in one process, one thread per rank,
//! each holding its own [`ThreadRank`]. It lets the tests run the real
//! collectives' protocols (and whole runs) on several ranks without
//! `mpirun`, and it fails the way a real communicator must: a rank whose
//! thread ends (returns or panics) without joining a collective makes the
//! others' collectives return [`Error::Communicator`] naming it, instead
//! of leaving them waiting.
//!
//! Every collective is an exchange of one payload per rank through a
//! shared slot table guarded by a mutex and a condition variable. The
//! progress sums use a channel of their own, as [`super::mpi_world`] uses
//! a duplicate communicator for them. Each payload carries the name of the
//! collective it was sent by, so ranks that call different collectives at
//! the same step (a protocol bug) fail instead of misreading each other.

use super::Communicator;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a collective waits for the other ranks before failing: far
/// longer than any test's step, so that only a rank stuck for good (a
/// deadlock in the code under test) ends a collective this way.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The ranks of one in-process job.
#[derive(Debug)]
pub struct ThreadWorld {
    shared: Arc<Shared>,
}

impl ThreadWorld {
    /// A job of `size` ranks (at least one) whose collectives wait at most
    /// [`DEFAULT_TIMEOUT`].
    pub fn new(size: usize) -> ThreadWorld {
        ThreadWorld::with_timeout(size, DEFAULT_TIMEOUT)
    }

    /// A job of `size` ranks whose collectives wait at most `timeout` for
    /// the others.
    pub fn with_timeout(size: usize, timeout: Duration) -> ThreadWorld {
        let size = size.max(1);
        let channel = || Channel {
            slots: vec![None; size],
            filled: 0,
            result: None,
            readers_left: 0,
        };
        ThreadWorld {
            shared: Arc::new(Shared {
                size,
                timeout,
                state: Mutex::new(State {
                    channels: [channel(), channel()],
                    departed: None,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// One handle per rank, in rank order; hand each to its own thread.
    pub fn ranks(self) -> Vec<ThreadRank> {
        (0..self.shared.size)
            .map(|rank| ThreadRank {
                rank,
                shared: Arc::clone(&self.shared),
                received: AtomicU64::new(0),
            })
            .collect()
    }
}

/// Runs `work` on `size` ranks, each on its own thread with its own
/// [`ThreadRank`], and returns each rank's outcome in rank order (`Err`
/// holding the panic of a rank that panicked).
pub fn run_ranks<T: Send>(
    size: usize,
    work: impl Fn(&ThreadRank) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    let work = &work;
    std::thread::scope(|scope| {
        let threads: Vec<_> = ThreadWorld::new(size)
            .ranks()
            .into_iter()
            .map(|rank| scope.spawn(move || work(&rank)))
            .collect();
        threads.into_iter().map(|t| t.join()).collect()
    })
}

/// One rank's handle. Dropping it (its thread returned or unwound) tells
/// the others that this rank will join no more collectives.
#[derive(Debug)]
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    /// Payload bytes this rank has received from the main lane's
    /// collectives (copied out of the exchange), for tests of what a
    /// protocol costs each rank.
    received: AtomicU64,
}

impl ThreadRank {
    /// Payload bytes this rank has received so far from `gather`,
    /// `all_gather` and `broadcast` (what it holds afterwards, not what
    /// the exchange shares).
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn received(&self, parts: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        let parts: Vec<Vec<u8>> = parts.into_iter().collect();
        let bytes: usize = parts.iter().map(Vec::len).sum();
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        parts
    }
}

/// Which exchange a collective goes through.
#[derive(Clone, Copy, Debug)]
enum Lane {
    /// Everything but progress.
    Main = 0,
    /// `sum_polled`.
    Progress = 1,
}

/// A payload and the collective that sent it.
type Part = (&'static str, Vec<u8>);

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    channels: [Channel; 2],
    /// The first rank whose handle was dropped.
    departed: Option<usize>,
}

/// One exchange at a time: the ranks fill their slots; the last to arrive
/// moves them into `result`, which stays until every rank has read it, so
/// that a fast rank cannot start the next exchange over a slow rank's
/// unread result.
#[derive(Debug)]
struct Channel {
    slots: Vec<Option<Part>>,
    filled: usize,
    result: Option<Arc<Vec<Part>>>,
    readers_left: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (no user code runs
        // under it), so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ThreadRank {
    fn error(&self, reason: String) -> Error {
        Error::Communicator {
            rank: self.rank,
            reason,
            hint: "every rank's thread must join every collective: see the failing rank's own error or panic".into(),
        }
    }

    /// The error of a collective whose deadline passed.
    fn timeout_error(&self, what: &str) -> Error {
        self.error(format!(
            "{what}: the other ranks did not arrive within {} s",
            self.shared.timeout.as_secs_f64()
        ))
    }

    /// The error of a collective that must stop waiting: a rank left, or
    /// the deadline passed.
    fn stop_waiting(&self, state: &State, deadline: Instant, what: &str) -> Option<Error> {
        match state.departed {
            Some(departed) => Some(self.departed_error(departed, what)),
            None if Instant::now() >= deadline => Some(self.timeout_error(what)),
            None => None,
        }
    }

    /// Waits on the condition variable, at most until the deadline.
    fn wait<'a>(&self, state: MutexGuard<'a, State>, deadline: Instant) -> MutexGuard<'a, State> {
        let left = deadline.saturating_duration_since(Instant::now());
        let (state, _) = self
            .shared
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner);
        state
    }

    fn departed_error(&self, departed: usize, what: &str) -> Error {
        self.error(format!(
            "{what}: rank {departed} ended without joining this collective"
        ))
    }

    /// Collective: sends `bytes` as collective `what` and receives every
    /// rank's payload, in rank order.
    fn exchange(&self, lane: Lane, what: &'static str, bytes: &[u8]) -> Result<Arc<Vec<Part>>> {
        let shared = &*self.shared;
        let deadline = Instant::now() + shared.timeout;
        let mut state = shared.lock();
        // The previous exchange's result must be read by everyone first.
        while state.channels[lane as usize].result.is_some() {
            if let Some(err) = self.stop_waiting(&state, deadline, what) {
                return Err(err);
            }
            state = self.wait(state, deadline);
        }
        if let Some(departed) = state.departed {
            return Err(self.departed_error(departed, what));
        }
        let channel = &mut state.channels[lane as usize];
        channel.slots[self.rank] = Some((what, bytes.to_vec()));
        channel.filled += 1;
        if channel.filled == shared.size {
            let parts = channel.slots.iter_mut().filter_map(Option::take).collect();
            channel.result = Some(Arc::new(parts));
            channel.filled = 0;
            channel.readers_left = shared.size;
            shared.changed.notify_all();
        }
        loop {
            let channel = &mut state.channels[lane as usize];
            // A result that is complete is taken even if a rank has left
            // since: it joined this collective before it went.
            if let Some(result) = channel.result.clone() {
                channel.readers_left -= 1;
                if channel.readers_left == 0 {
                    channel.result = None;
                    shared.changed.notify_all();
                }
                return self.check_same_collective(&result, what).map(|()| result);
            }
            if let Some(err) = self.stop_waiting(&state, deadline, what) {
                // This rank leaves the exchange (under the same lock, so no
                // rank completes it meanwhile): its payload goes with it,
                // or the next collective would complete with it as if it
                // were this rank's new one.
                let channel = &mut state.channels[lane as usize];
                if channel.slots[self.rank].take().is_some() {
                    channel.filled -= 1;
                }
                return Err(err);
            }
            state = self.wait(state, deadline);
        }
    }

    /// Every rank must have called the same collective.
    fn check_same_collective(&self, parts: &[Part], what: &str) -> Result<()> {
        if parts.iter().all(|(called, _)| *called == what) {
            return Ok(());
        }
        let called: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(rank, (called, _))| format!("rank {rank} {called}"))
            .collect();
        Err(self.error(format!(
            "the ranks called different collectives: {}",
            called.join(", ")
        )))
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.departed.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn ranks_on_node(&self) -> usize {
        self.shared.size
    }

    fn lowest_failed(&self, failed: bool) -> Result<Option<usize>> {
        let parts = self.exchange(Lane::Main, "lowest_failed", &[u8::from(failed)])?;
        Ok(parts.iter().position(|(_, bytes)| bytes == &[1]))
    }

    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let parts = self.exchange(Lane::Main, "gather", bytes)?;
        Ok((self.rank == 0).then(|| self.received(parts.iter().map(|(_, b)| b.clone()))))
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let parts = self.exchange(Lane::Main, "all_gather", bytes)?;
        Ok(self.received(parts.iter().map(|(_, b)| b.clone())))
    }

    fn broadcast(&self, root: usize, bytes: &[u8]) -> Result<Vec<u8>> {
        // Only the root's payload goes through the exchange.
        let mine = if self.rank == root { bytes } else { &[] };
        let parts = self.exchange(Lane::Main, "broadcast", mine)?;
        let sent = parts.get(root).map(|(_, b)| b.clone()).ok_or_else(|| {
            self.error(format!(
                "broadcast from rank {root} in a job of {}",
                parts.len()
            ))
        })?;
        Ok(self.received([sent]).swap_remove(0))
    }

    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]> {
        let mine: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let parts = self.exchange(Lane::Progress, "sum_polled", &mine)?;
        let mut sums = [0u64; 2];
        for (_, bytes) in parts.iter() {
            for (sum, value) in sums.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut word = [0u8; 8];
                word.copy_from_slice(value);
                *sum += u64::from_le_bytes(word);
            }
        }
        Ok(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_receives_every_payload_in_rank_order() {
        let outcomes = run_ranks(4, |comm| {
            let mine = vec![comm.rank() as u8; comm.rank() * 3];
            let all = comm.all_gather(&mine).unwrap();
            let gathered = comm.gather(&mine).unwrap();
            (all, gathered)
        });
        let expected: Vec<Vec<u8>> = (0..4).map(|r| vec![r as u8; r * 3]).collect();
        for (rank, outcome) in outcomes.into_iter().enumerate() {
            let (all, gathered) = outcome.unwrap();
            assert_eq!(all, expected, "rank {rank}");
            assert_eq!(
                gathered,
                (rank == 0).then(|| expected.clone()),
                "rank {rank}"
            );
        }
    }

    #[test]
    fn many_rounds_in_a_row_never_mix_their_payloads() {
        let outcomes = run_ranks(3, |comm| {
            (0..200u32)
                .map(|round| {
                    let mine = (round * 10 + comm.rank() as u32).to_le_bytes();
                    comm.all_gather(&mine).unwrap()
                })
                .collect::<Vec<_>>()
        });
        for outcome in outcomes {
            for (round, parts) in outcome.unwrap().into_iter().enumerate() {
                let values: Vec<u32> = parts
                    .iter()
                    .map(|p| u32::from_le_bytes(p[..4].try_into().unwrap()))
                    .collect();
                let round = round as u32;
                assert_eq!(values, [round * 10, round * 10 + 1, round * 10 + 2]);
            }
        }
    }

    #[test]
    fn the_lowest_failed_rank_and_the_sums_are_the_same_everywhere() {
        let outcomes = run_ranks(4, |comm| {
            let none = comm.lowest_failed(false).unwrap();
            let lowest = comm.lowest_failed(comm.rank() >= 2).unwrap();
            let sums = comm.sum_polled([comm.rank() as u64 * 100, 1]).unwrap();
            (none, lowest, sums)
        });
        for outcome in outcomes {
            assert_eq!(outcome.unwrap(), (None, Some(2), [600, 4]));
        }
    }

    #[test]
    fn a_rank_that_returns_without_joining_fails_the_others_collective() {
        let outcomes = run_ranks(3, |comm| match comm.rank() {
            1 => None,
            _ => Some(comm.all_gather(b"x").unwrap_err().to_string()),
        });
        for outcome in [&outcomes[0], &outcomes[2]] {
            let text = outcome.as_ref().unwrap().clone().unwrap();
            assert!(
                text.contains("rank 1 ended without joining this collective"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_rank_that_panics_fails_the_others_collective() {
        let outcomes = run_ranks(2, |comm| {
            if comm.rank() == 0 {
                panic!("rank 0 gives up");
            }
            comm.lowest_failed(false)
        });
        assert!(outcomes[0].is_err(), "rank 0 panicked");
        let err = outcomes[1].as_ref().unwrap().as_ref().unwrap_err();
        assert!(matches!(err, Error::Communicator { rank: 1, .. }), "{err}");
        assert!(err.to_string().contains("rank 0 ended"), "{err}");
    }

    #[test]
    fn a_rank_that_left_after_the_last_collective_is_no_failure() {
        // Rank 0 reads the result and leaves before rank 1 wakes up to read
        // it: rank 1 must still get it.
        for _ in 0..50 {
            let outcomes = run_ranks(2, |comm| comm.all_gather(&[comm.rank() as u8]));
            for outcome in outcomes {
                assert_eq!(outcome.unwrap().unwrap(), [vec![0], vec![1]]);
            }
        }
    }

    #[test]
    fn ranks_calling_different_collectives_fail_instead_of_misreading() {
        let outcomes = run_ranks(2, |comm| match comm.rank() {
            0 => comm.all_gather(b"a").map(drop),
            _ => comm.gather(b"b").map(drop),
        });
        for outcome in outcomes {
            let text = outcome.unwrap().unwrap_err().to_string();
            assert!(text.contains("rank 0 all_gather, rank 1 gather"), "{text}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out() {
        let world = ThreadWorld::with_timeout(2, Duration::from_millis(50));
        let ranks = world.ranks();
        // Rank 1 stays alive (its handle is held) but never joins.
        let err = ranks[0].lowest_failed(false).unwrap_err();
        assert!(err.to_string().contains("did not arrive"), "{err}");
    }

    #[test]
    fn a_rank_that_timed_out_withdraws_its_payload() {
        let world = ThreadWorld::with_timeout(2, Duration::from_millis(50));
        let ranks = world.ranks();
        let err = ranks[0].all_gather(b"stale").unwrap_err();
        assert!(err.to_string().contains("did not arrive"), "{err}");
        // Rank 1 arrives first at the next exchange: it must wait for rank
        // 0's new payload, not complete with the one that timed out.
        std::thread::scope(|s| {
            let late = s.spawn(|| ranks[1].all_gather(b"one"));
            std::thread::sleep(Duration::from_millis(20));
            let mine = ranks[0].all_gather(b"zero").unwrap();
            let theirs = late.join().unwrap().unwrap();
            for got in [mine, theirs] {
                assert_eq!(got, [b"zero".to_vec(), b"one".to_vec()]);
            }
        });
    }

    #[test]
    fn progress_sums_do_not_mix_with_the_other_collectives() {
        // Rank 0 sums first and then gathers, rank 1 the other way round:
        // on separate channels both complete.
        let outcomes = run_ranks(2, |comm| {
            if comm.rank() == 0 {
                let sums = comm.sum_polled([1, 0]).unwrap();
                (sums, comm.all_gather(b"0").unwrap())
            } else {
                std::thread::scope(|s| {
                    let gathered = s.spawn(|| comm.all_gather(b"1").unwrap());
                    let sums = comm.sum_polled([2, 0]).unwrap();
                    (sums, gathered.join().unwrap())
                })
            }
        });
        for outcome in outcomes {
            assert_eq!(
                outcome.unwrap(),
                ([3, 0], vec![b"0".to_vec(), b"1".to_vec()])
            );
        }
    }
}
