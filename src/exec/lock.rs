//! The OUTPUT_DIR lock: one run at a time writes into a folder.
//!
//! Rank 0 creates `OUTPUT_DIR/.st-consolidate.lock` exclusively, and only
//! ever whole, before it touches anything in the folder, and removes it when
//! the run ends. The file names its holder (host, pid, the process's start
//! time and the run's start time), so a second run refuses with a message that says who
//! holds the folder, and a lock left by a killed run on the same host is
//! recognised (its process is gone, or the pid now belongs to a process that
//! started later) and taken over. A lock from another host cannot be checked
//! from here; the message then says how to clear it safely.
//!
//! The lock's contents are unique to the run, which also makes it the token
//! by which every rank proves it sees the same OUTPUT_DIR as rank 0.

use crate::error::{Error, Result};
use crate::exec::output::PendingFile;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The lock file's name inside OUTPUT_DIR.
pub const LOCK_NAME: &str = ".st-consolidate.lock";

/// Who holds an OUTPUT_DIR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name of the holding process.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22),
    /// which tells a live holder from a later process that reused the pid.
    pub process_start: Option<u64>,
    /// When the run took the lock, in nanoseconds since the Unix epoch.
    pub started_ns: u128,
}

impl Holder {
    /// This process.
    pub fn me() -> Holder {
        let pid = std::process::id();
        Holder {
            host: host_name(),
            pid,
            process_start: process_start(pid),
            started_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        }
    }

    /// Whether this holder is known to be gone: it ran on this host and its
    /// process no longer exists, or the pid now belongs to another process.
    fn is_dead_here(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        match process_start(self.pid) {
            None => true,
            Some(now) => self.process_start.is_some_and(|then| then != now),
        }
    }

    fn describe(&self) -> String {
        let secs = (self.started_ns / 1_000_000_000) as u64;
        format!(
            "host {}, pid {}, started at {} (Unix time {secs})",
            self.host,
            self.pid,
            utc_time(secs)
        )
    }
}

/// Holds OUTPUT_DIR for this run; the lock file is removed on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    token: Vec<u8>,
}

impl OutputLock {
    /// Takes the lock on `dir` (which must exist) for `holder`, taking over
    /// a lock whose holder is known to be dead.
    pub fn acquire(dir: &Path, holder: &Holder) -> Result<OutputLock> {
        let path = dir.join(LOCK_NAME);
        let mut token = serde_json::to_vec(holder).map_err(|e| {
            Error::internal(format!("cannot encode the lock of {}: {e}", path.display()))
        })?;
        token.push(b'\n');
        // The token is written and synced under a name of this run's own,
        // then given the lock's name in one step: the lock never exists
        // without its token, so a failed write (a full disk) or a crash
        // leaves no lock at all rather than one no later run can read. The
        // staged file is removed on drop, or by the next run's cleanup of
        // stale temporaries if this process is killed first.
        let staged_name = format!(
            "st-consolidate.lock.{}-{}",
            std::process::id(),
            holder.started_ns
        );
        let staged = PendingFile::with_contents(dir, &staged_name, &token)?;
        // Two attempts: the second after removing a dead holder's lock.
        for _ in 0..2 {
            match place_token(staged.temp_path(), &path, &token) {
                Ok(()) => return Ok(OutputLock { path, token }),
                // NotFound: the holder's cleanup of stale temporaries removed
                // our staged token, so there is a holder to name.
                Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::NotFound) => {
                    let text = std::fs::read(&path).unwrap_or_default();
                    match serde_json::from_slice::<Holder>(&text) {
                        Ok(other) if other.is_dead_here() => {
                            // Remove only the lock we judged: if another run
                            // took it over meanwhile, its contents differ.
                            if std::fs::read(&path).ok().as_deref() == Some(&text[..]) {
                                let _ = std::fs::remove_file(&path);
                            }
                        }
                        Ok(other) => return Err(held_by(dir, &path, &other.describe())),
                        Err(_) => {
                            return Err(held_by(dir, &path, "a holder it cannot read"));
                        }
                    }
                }
                Err(e) => return Err(Error::io("create the lock", &path, e)),
            }
        }
        Err(held_by(dir, &path, "a run that took it over just now"))
    }

    /// The bytes of the lock file: unique to this run.
    pub fn token(&self) -> &[u8] {
        &self.token
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Only our own lock: never one a later run wrote.
        if std::fs::read(&self.path).ok().as_deref() == Some(&self.token[..]) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn held_by(dir: &Path, path: &Path, holder: &str) -> Error {
    Error::usage(
        format!(
            "OUTPUT_DIR {} is in use by another run: {holder}",
            dir.display()
        ),
        format!(
            "wait for that run to finish, or choose another OUTPUT_DIR; if it is certainly no longer running (killed on another node), remove {} and rerun",
            path.display()
        ),
    )
}

/// Gives the synced token at `staged` the name `lock`, failing with
/// `AlreadyExists` if `lock` exists: `link(2)`, which refuses an existing
/// name as `O_EXCL` does, so one run at a time gets the lock. On a
/// filesystem without hard links, the lock is created with `O_EXCL` and the
/// token written into it instead, and removed again if that write fails.
fn place_token(staged: &Path, lock: &Path, token: &[u8]) -> std::io::Result<()> {
    match std::fs::hard_link(staged, lock) {
        Err(e) if has_no_hard_links(&e) => create_exclusive(lock, |file| {
            file.write_all(token)?;
            file.sync_all()
        }),
        other => other,
    }
}

/// What `link(2)` returns where the filesystem has no hard links (FAT,
/// some FUSE and network filesystems).
fn has_no_hard_links(err: &std::io::Error) -> bool {
    [Errno::PERM, Errno::OPNOTSUPP, Errno::NOSYS]
        .iter()
        .any(|errno| err.raw_os_error() == Some(errno.raw_os_error()))
}

/// Creates `path` with `O_EXCL` and fills it with `write`; if `write` fails
/// the file is removed, so no empty or partial lock is left behind.
fn create_exclusive(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    write(&mut file).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Reads the lock file of `dir` as another rank sees it: the token rank 0
/// wrote, if this rank sees the same folder.
pub fn read_token(dir: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(dir.join(LOCK_NAME))
}

/// This machine's host name.
pub fn host_name() -> String {
    // The UTS namespace's name, as `hostname` prints it.
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".to_string())
}

/// A live process's start time since boot, in clock ticks, or `None` if
/// there is no such process or it has exited (a zombie not yet reaped).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after the last ')' are the state (field 3), then plain numbers; start
    // time is field 22.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// `YYYY-MM-DD HH:MM:SS UTC` for Unix time `secs` (days-to-civil conversion,
/// so no date crate is needed for one line of a message).
fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(dir.path(), &Holder::me()).unwrap();
        let err = OutputLock::acquire(dir.path(), &Holder::me())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use by another run"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&host_name()), "{err}");
        assert!(
            err.contains(LOCK_NAME),
            "the hint says what to remove: {err}"
        );
        assert_eq!(read_token(dir.path()).unwrap(), first.token());
        drop(first);
        assert!(!dir.path().join(LOCK_NAME).exists());
        OutputLock::acquire(dir.path(), &Holder::me()).unwrap();
    }

    #[test]
    fn a_dead_holder_on_this_host_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited: its pid is free (or reused later).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Holder {
            pid,
            process_start: Some(1),
            ..Holder::me()
        };
        let stale = OutputLock::acquire(dir.path(), &dead).unwrap();
        std::mem::forget(stale); // as if killed: the file stays
        let lock = OutputLock::acquire(dir.path(), &Holder::me()).unwrap();
        assert_eq!(read_token(dir.path()).unwrap(), lock.token());
    }

    #[test]
    fn a_holder_on_another_host_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Holder {
            host: "some-other-node".into(),
            pid: 1,
            ..Holder::me()
        };
        std::mem::forget(OutputLock::acquire(dir.path(), &remote).unwrap());
        let err = OutputLock::acquire(dir.path(), &Holder::me())
            .unwrap_err()
            .to_string();
        assert!(err.contains("host some-other-node, pid 1"), "{err}");
    }

    #[test]
    fn a_live_holder_on_this_host_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // pid 1 is alive; its recorded start time is its real one.
        let live = Holder {
            pid: 1,
            process_start: process_start(1),
            ..Holder::me()
        };
        std::mem::forget(OutputLock::acquire(dir.path(), &live).unwrap());
        assert!(OutputLock::acquire(dir.path(), &Holder::me()).is_err());
    }

    #[test]
    fn the_fallback_lock_is_removed_when_its_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_NAME);
        let err = create_exclusive(&path, |_| Err(Errno::NOSPC.into())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::NOSPC.raw_os_error()));
        assert!(!path.exists(), "an empty lock was left behind");
        create_exclusive(&path, |file| file.write_all(b"token")).unwrap();
        let again = create_exclusive(&path, |_| Ok(())).unwrap_err();
        assert_eq!(again.kind(), ErrorKind::AlreadyExists, "O_EXCL still holds");
        assert_eq!(std::fs::read(&path).unwrap(), b"token");
    }

    #[test]
    fn taking_the_lock_leaves_only_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let lock = OutputLock::acquire(dir.path(), &Holder::me()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [LOCK_NAME], "the staged token is removed");
        drop(lock);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(1_795_960_000), "2026-11-29 13:46:40 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
