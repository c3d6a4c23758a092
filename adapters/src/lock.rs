//! One writer at a time: every change to the registry (add, promote, rollback, gc) holds an exclusive
//! lock on `adapters/.lock`. A second writer waits for it up to a timeout and then fails, naming the
//! process that holds it. The lock is the operating system's (`flock`), so a process that dies
//! releases it; readers never take it (CURRENT is replaced by an atomic rename).

use std::fs::{File, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{AdapterError, Result};

/// Held while it lives.
#[derive(Debug)]
pub struct RegistryLock {
    file: File,
    path: PathBuf,
}

impl RegistryLock {
    /// Take the lock on `path`, waiting up to `wait`.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AdapterError::io("create", dir, e))?;
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| AdapterError::io("open", path, e))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if started.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                        .map(|pid| format!(" (pid {pid})"))
                        .unwrap_or_default();
                    return Err(AdapterError::Locked {
                        path: path.to_path_buf(),
                        holder,
                        waited_s: started.elapsed().as_secs_f64(),
                    });
                }
                Err(TryLockError::Error(e)) => return Err(AdapterError::io("lock", path, e)),
            }
        }
        let mut lock = Self {
            file,
            path: path.to_path_buf(),
        };
        // Who holds it, for the message a waiting writer gives up with.
        let pid = std::process::id().to_string();
        let written = lock
            .file
            .set_len(0)
            .and_then(|()| lock.file.rewind())
            .and_then(|()| lock.file.write_all(pid.as_bytes()));
        if let Err(e) = written {
            tracing::debug!(path = %lock.path.display(), error = %e, "cannot note the lock holder");
        }
        lock.file.flush().ok();
        Ok(lock)
    }
}

impl Drop for RegistryLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_waits_then_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let held = RegistryLock::acquire(&path, Duration::ZERO).unwrap();
        let e = RegistryLock::acquire(&path, Duration::from_millis(120)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("locked by another pai process")
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(held);
        // Released: the next one gets it at once.
        RegistryLock::acquire(&path, Duration::ZERO).unwrap();
        // A waiter gets it when the holder lets go within its wait.
        let held = RegistryLock::acquire(&path, Duration::ZERO).unwrap();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                RegistryLock::acquire(&path, Duration::from_secs(10)).is_ok()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        assert!(waiter.join().unwrap());
    }
}
