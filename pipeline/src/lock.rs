//! One nightly run at a time: a run holds an exclusive lock (`flock`) on `runs/nightly.lock` for as
//! long as it lives, with its pid and start time written inside. The operating system drops the lock
//! when its process dies, so a lock left by a killed run is simply taken over; the pid still in the
//! file says it happened, and the new run warns about it.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// Held while it lives.
#[derive(Debug)]
pub struct NightlyLock {
    file: File,
    path: PathBuf,
    /// The pid of a run that died holding the lock, when this one took it over.
    pub took_over_from: Option<u32>,
}

impl NightlyLock {
    /// Take the lock or fail at once, naming the run that holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| PipelineError::io("create", dir, e))?;
        }
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| PipelineError::io("open", path, e))?;
        let mut previous = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut previous);
                let (pid, started) = holder(&previous);
                return Err(PipelineError::Locked {
                    path: path.to_path_buf(),
                    pid: pid.unwrap_or(0),
                    started: started.unwrap_or_else(|| "at an unknown time".into()),
                });
            }
            Err(TryLockError::Error(e)) => return Err(PipelineError::io("lock", path, e)),
        }
        let _ = file.read_to_string(&mut previous);
        let took_over_from = holder(&previous).0.filter(|&pid| pid != std::process::id());
        if let Some(pid) = took_over_from {
            tracing::warn!(
                pid,
                lock = %path.display(),
                "a nightly run (pid {pid}) died holding the lock; taking it over"
            );
        }
        let note = format!(
            "{}\n{}\n",
            std::process::id(),
            chrono::Local::now().to_rfc3339()
        );
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()))
            .and_then(|()| file.flush());
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "cannot note the lock holder");
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            took_over_from,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NightlyLock {
    fn drop(&mut self) {
        // A clean end leaves an empty file: a pid left inside means a run died.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// The pid and start time a lock file records.
fn holder(text: &str) -> (Option<u32>, Option<String>) {
    let mut lines = text.lines();
    let pid = lines.next().and_then(|l| l.trim().parse().ok());
    let started = lines
        .next()
        .map(|l| l.trim().to_string())
        .filter(|s| !s.is_empty());
    (pid, started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs").join("nightly.lock");
        let first = NightlyLock::acquire(&path).unwrap();
        assert_eq!(first.took_over_from, None);
        // flock locks belong to open files: a second open in this process is refused like another
        // process would be.
        let e = NightlyLock::acquire(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "a clean end leaves no pid"
        );
        // A run that died (here: pid 999999, which holds no lock) left its pid behind.
        std::fs::write(&path, "999999\n2026-12-03T02:30:00+00:00\n").unwrap();
        let taken = NightlyLock::acquire(&path).unwrap();
        assert_eq!(taken.took_over_from, Some(999_999));
    }
}
