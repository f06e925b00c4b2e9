//! The failure protocol: what every rank learns when one fails.
//!
//! Each phase of a run ends in one collective ([`crate::comm::collectives::agree`])
//! where the ranks learn whether any failed; the lowest failing rank then
//! sends every rank its [`Failure`]: its rank, its [`FailureKind`] and its
//! message. So every rank fails with the same cause, and the front ends
//! only translate kinds: the command into its exit code and one message
//! (printed by the failing rank), the Python extension into an exception
//! (`KeyboardInterrupt` on the rank that was interrupted,
//! `ConsolidationError` naming that rank on the others). A panic inside a
//! phase is caught there ([`catch_panic`]) and becomes an internal failure
//! of that rank, so the collectives stay matched and nothing hangs.

pub use crate::error::FailureKind;
use crate::error::{Error, Result, StopReason};
use std::panic::{AssertUnwindSafe, catch_unwind};

impl FailureKind {
    const ALL: [FailureKind; 6] = [
        FailureKind::Input,
        FailureKind::Interrupted,
        FailureKind::Exited,
        FailureKind::Departed,
        FailureKind::Internal,
        FailureKind::Failed,
    ];

    /// What happened to the rank, as the other ranks say it.
    pub fn what_happened(self) -> &'static str {
        match self {
            FailureKind::Input => "refused its input",
            FailureKind::Interrupted => "was interrupted",
            FailureKind::Exited => "was stopped by its process exiting",
            FailureKind::Departed => "lost contact with the other ranks",
            FailureKind::Internal => "hit a bug",
            FailureKind::Failed => "failed",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

impl Error {
    /// This error's kind, for the protocol and the front ends.
    pub fn kind(&self) -> FailureKind {
        match self {
            Error::BadFile { .. }
            | Error::BadTensor { .. }
            | Error::NotDcpShard { .. }
            | Error::Inconsistent { .. }
            | Error::Mapping { .. }
            | Error::Unmapped { .. }
            | Error::Usage { .. }
            | Error::BadCheckpoint { .. }
            | Error::BadIndex { .. } => FailureKind::Input,
            Error::Cancelled(StopReason::Interrupted) => FailureKind::Interrupted,
            Error::Cancelled(StopReason::Exiting) => FailureKind::Exited,
            Error::Communicator { .. } => FailureKind::Departed,
            Error::Internal { .. } => FailureKind::Internal,
            Error::PeerFailed { kind, .. } => *kind,
            _ => FailureKind::Failed,
        }
    }
}

/// One rank's failure as it crosses the communicator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The rank where it happened (for a failure passed on, the first one).
    pub rank: usize,
    /// What happened.
    pub kind: FailureKind,
    /// The error's message, as that rank shows it.
    pub message: String,
}

impl Failure {
    /// `err`, which happened on `rank` (or, passed on, where it came from).
    pub fn of(rank: usize, err: &Error) -> Failure {
        match err {
            Error::PeerFailed {
                rank,
                kind,
                message,
            } => Failure {
                rank: *rank,
                kind: *kind,
                message: message.clone(),
            },
            _ => Failure {
                rank,
                kind: err.kind(),
                message: err.to_string(),
            },
        }
    }

    /// As bytes: the rank (8 bytes, little-endian), the kind (1), the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = (self.rank as u64).to_le_bytes().to_vec();
        bytes.push(self.kind.code());
        bytes.extend_from_slice(self.message.as_bytes());
        bytes
    }

    /// What [`Failure::encode`] wrote, or an error saying what arrived.
    pub fn decode(bytes: &[u8]) -> Result<Failure> {
        let garbled = || {
            Error::ranks_disagree(
                format!(
                    "a rank failed, but the failure it sent cannot be read ({} bytes)",
                    bytes.len()
                ),
                "all ranks must run the same st-consolidate-mpi version",
            )
        };
        let (rank, rest) = bytes.split_first_chunk::<8>().ok_or_else(garbled)?;
        let (&kind, message) = rest.split_first().ok_or_else(garbled)?;
        Ok(Failure {
            rank: usize::try_from(u64::from_le_bytes(*rank)).map_err(|_| garbled())?,
            kind: FailureKind::from_code(kind).ok_or_else(garbled)?,
            message: String::from_utf8_lossy(message).into_owned(),
        })
    }

    /// The error another rank returns for this failure.
    pub fn into_peer_error(self) -> Error {
        Error::PeerFailed {
            rank: self.rank,
            kind: self.kind,
            message: self.message,
        }
    }
}

/// The one message every rank of a job of `size` shows for `err`, which
/// this `rank` returned: another rank's failure as it was sent, this
/// rank's own one naming it the same way ("rank 1 refused its input: …").
pub fn job_message(err: &Error, rank: usize, size: usize) -> String {
    match err {
        Error::PeerFailed { .. } => err.to_string(),
        _ if size > 1 => Failure::of(rank, err).into_peer_error().to_string(),
        _ => err.to_string(),
    }
}

/// Runs `work`, turning a panic in it into an internal failure of this
/// rank in `phase`, so that this rank still joins the phase's collective.
pub fn catch_panic<T>(rank: usize, phase: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Err(Error::internal(format!(
            "rank {rank} panicked while {phase}: {text}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_cross_as_they_were_sent() {
        for kind in FailureKind::ALL {
            let failure = Failure {
                rank: 513,
                kind,
                message: "x: y\n  hint: é".into(),
            };
            assert_eq!(Failure::decode(&failure.encode()).unwrap(), failure);
        }
        assert!(Failure::decode(&[1, 2, 3]).is_err());
        assert!(Failure::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 99]).is_err());
    }

    #[test]
    fn a_failure_passed_on_keeps_where_it_came_from() {
        let peer = Failure {
            rank: 3,
            kind: FailureKind::Interrupted,
            message: "stopped".into(),
        }
        .into_peer_error();
        assert_eq!(peer.kind(), FailureKind::Interrupted);
        let passed = Failure::of(0, &peer);
        assert_eq!((passed.rank, passed.message.as_str()), (3, "stopped"));
        assert!(
            peer.to_string()
                .starts_with("rank 3 was interrupted: stopped")
        );
    }

    #[test]
    fn a_panic_becomes_an_internal_failure_naming_the_rank_and_phase() {
        let err = catch_panic::<()>(2, "copying", || panic!("boom")).unwrap_err();
        assert_eq!(err.kind(), FailureKind::Internal);
        assert!(
            err.to_string()
                .contains("rank 2 panicked while copying: boom")
        );
    }
}
