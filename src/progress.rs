//! Progress for the whole job, shown by rank 0.
//!
//! Worker threads count the bytes they copy in an atomic. Meanwhile the main
//! thread of every rank runs rounds: at each interval (or as soon as its own
//! work is done) it joins a non-blocking sum of (bytes copied, ranks still
//! copying) over all ranks. Every rank sees the same sums, so all leave the
//! loop in the same round, when no rank is still copying; a rank that
//! finished early or failed keeps joining rounds until then, so no collective
//! is left waiting. What rank 0 shows is the front end's
//! [`ProgressView`].

use crate::Result;
use crate::comm::Communicator;
use crate::messages::ProgressView;
use crate::report::human_bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters shared between the copying threads and the progress loop.
#[derive(Debug, Default)]
pub struct Counters {
    /// Tensor bytes this rank has copied so far.
    pub copied: AtomicU64,
    /// Set when this rank's copying has ended, successfully or not.
    pub finished: AtomicBool,
}

/// Sets [`Counters::finished`] when dropped, even if the copy panics.
pub struct FinishOnDrop<'a>(pub &'a Counters);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::Release);
    }
}

/// Runs progress rounds until every rank has finished copying. `view` is
/// the display on the rank that shows it (rank 0, unless quiet), `None`
/// elsewhere. A failing collective ends the rounds with its error.
pub fn watch(
    comm: &dyn Communicator,
    interval: Duration,
    counters: &Counters,
    view: Option<&dyn ProgressView>,
) -> Result<()> {
    let started = Instant::now();
    let round = view.map_or(interval, |view| view.round(interval));
    let mut next = started + round;
    loop {
        while !counters.finished.load(Ordering::Acquire) && Instant::now() < next {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
        let still_copying = u64::from(!counters.finished.load(Ordering::Acquire));
        let [done, copying] =
            comm.sum_polled([counters.copied.load(Ordering::Relaxed), still_copying])?;
        if let Some(view) = view {
            view.update(done, started.elapsed());
        }
        if copying == 0 {
            break;
        }
        next = Instant::now() + round;
    }
    if let Some(view) = view {
        view.finish();
    }
    Ok(())
}

/// One log line: bytes done of total, percent, rate and time left.
pub fn line(done: u64, total: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let rate = done as f64 / seconds;
    let percent = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let left = if rate > 0.0 {
        format!("{:.0} s left", (total.saturating_sub(done)) as f64 / rate)
    } else {
        "time left unknown".to_string()
    };
    format!(
        "progress: {} of {} ({percent:.1}%), {:.2} GB/s, {left}",
        human_bytes(done),
        human_bytes(total),
        rate / 1e9
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn lines_show_bytes_percent_rate_and_time_left() {
        let text = line(500_000_000, 2_000_000_000, Duration::from_secs(1));
        assert_eq!(
            text,
            "progress: 500.00 MB of 2.00 GB (25.0%), 0.50 GB/s, 3 s left"
        );
    }

    /// A world of two ranks: this one and a peer that reports `peer_bytes`
    /// and is still copying for its first `peer_busy_rounds` rounds. Every
    /// sum the loop receives is recorded.
    struct TwoRanks {
        peer_bytes: u64,
        peer_busy_rounds: usize,
        rounds: Mutex<Vec<[u64; 2]>>,
    }

    impl TwoRanks {
        fn new(peer_bytes: u64, peer_busy_rounds: usize) -> TwoRanks {
            TwoRanks {
                peer_bytes,
                peer_busy_rounds,
                rounds: Mutex::new(Vec::new()),
            }
        }

        fn rounds(&self) -> Vec<[u64; 2]> {
            self.rounds.lock().unwrap().clone()
        }
    }

    impl Communicator for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn ranks_on_node(&self) -> usize {
            2
        }
        fn lowest_failed(&self, failed: bool) -> Result<Option<usize>> {
            Ok(failed.then_some(0))
        }
        fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
            Ok(Some(vec![bytes.to_vec(), Vec::new()]))
        }
        fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![bytes.to_vec(), Vec::new()])
        }
        fn broadcast(&self, _root: usize, bytes: &[u8]) -> Result<Vec<u8>> {
            Ok(bytes.to_vec())
        }
        fn sum_polled(&self, [bytes, copying]: [u64; 2]) -> Result<[u64; 2]> {
            let mut rounds = self.rounds.lock().unwrap();
            let peer_copying = u64::from(rounds.len() < self.peer_busy_rounds);
            let sum = [bytes + self.peer_bytes, copying + peer_copying];
            rounds.push(sum);
            Ok(sum)
        }
    }

    #[test]
    fn rounds_run_while_copying_and_the_last_one_reports_everything() {
        let world = TwoRanks::new(0, 0);
        let counters = Counters::default();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _finish = FinishOnDrop(&counters);
                counters.copied.store(10, Ordering::Relaxed);
                // Finish only once the loop has run a round while copying.
                while world.rounds().is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                counters.copied.store(42, Ordering::Relaxed);
            });
            watch(&world, Duration::from_millis(10), &counters, None).unwrap();
        });
        let rounds = world.rounds();
        let (last, before) = rounds.split_last().unwrap();
        assert_eq!(*last, [42, 0], "{rounds:?}");
        assert!(!before.is_empty(), "{rounds:?}");
        assert!(before.iter().all(|r| r[1] == 1), "{rounds:?}");
    }

    #[test]
    fn a_rank_that_finished_keeps_joining_rounds_until_every_rank_has() {
        // This rank is done before the loop starts; the peer copies for three
        // more rounds. Leaving after the first round would leave the peer
        // waiting in a collective.
        let world = TwoRanks::new(100, 3);
        let counters = Counters::default();
        counters.copied.store(5, Ordering::Relaxed);
        counters.finished.store(true, Ordering::Release);
        watch(&world, Duration::from_secs(3600), &counters, None).unwrap();
        assert_eq!(world.rounds(), [[105, 1], [105, 1], [105, 1], [105, 0]]);
    }
}
