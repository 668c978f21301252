//! A model registry on disk: the versions of one in-distribution model and a `current` pointer.
//!
//! ```text
//! <dir>/                      e.g. models/registry/fashion-mnist
//!   current                   the current version's name (one line), replaced atomically
//!   versions/v0001/           model.safetensors, calibration.json, and what made it
//!   versions/v0002/           (eval.json, retrain.json) — never modified once written
//!   .retrain.lock             held (flock) while a retrain of this model runs
//! ```
//!
//! A version directory is written under a hidden name and renamed into place, and `current` is
//! replaced by rename after fsync, so readers (a running pipeline checks `current` between
//! batches) see the old version or the new one, never a partial one. Rollback points `current`
//! back at an older version.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::fsutil::{sync_dir, write_atomic};

/// Registry errors name the directory and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An I/O error on a registry path.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The registry is not in the expected state.
    #[error("registry {dir}: {problem}")]
    Invalid { dir: String, problem: String },
    /// Another process holds the retrain lock.
    #[error(
        "another retrain of {dir} is running (lock {lock} held{holder}); try again when it ends"
    )]
    Locked {
        dir: String,
        lock: String,
        holder: String,
    },
}

/// Result alias of the registry.
pub type Result<T> = std::result::Result<T, RegistryError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The file names inside a version directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Calibration of the version's flagged score.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// One model's registry.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

/// A version: its name (`v0001`) and directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `vNNNN`.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
}

impl Version {
    /// The model file.
    pub fn model(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    /// The calibration file (may be absent).
    pub fn calibration(&self) -> PathBuf {
        self.dir.join(CALIBRATION_FILE)
    }
}

/// The retrain lock; released on drop.
#[derive(Debug)]
pub struct RetrainLock {
    _file: File,
}

impl Registry {
    /// Opens (or creates) the registry directory of one model.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let versions = dir.join("versions");
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        Ok(Self { dir })
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn invalid(&self, problem: impl Into<String>) -> RegistryError {
        RegistryError::Invalid {
            dir: self.dir.display().to_string(),
            problem: problem.into(),
        }
    }

    /// A version by name (it must exist).
    pub fn version(&self, name: &str) -> Result<Version> {
        let dir = self.dir.join("versions").join(name);
        if !dir.join(MODEL_FILE).is_file() {
            return Err(self.invalid(format!("no version `{name}` (no {MODEL_FILE} in it)")));
        }
        Ok(Version {
            name: name.to_string(),
            dir,
        })
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<Version>> {
        let d = self.dir.join("versions");
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .map_err(io(&d))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('v') && n[1..].chars().all(|c| c.is_ascii_digit()))
            .collect();
        names.sort();
        names.iter().map(|n| self.version(n)).collect()
    }

    /// The version `current` points at (None for an empty registry).
    pub fn current(&self) -> Result<Option<Version>> {
        let p = self.dir.join("current");
        match std::fs::read_to_string(&p) {
            Ok(s) => self.version(s.trim()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Adds a version holding `model` (copied) and optional extra files (name, bytes); returns
    /// it. It is complete before it becomes visible; `current` does not move.
    pub fn add_version(&self, model: &Path, extra: &[(&str, Vec<u8>)]) -> Result<Version> {
        let next = self
            .versions()?
            .last()
            .map(|v| v.name[1..].parse::<u32>().unwrap_or(0) + 1)
            .unwrap_or(1);
        let name = format!("v{next:04}");
        let versions = self.dir.join("versions");
        let tmp = versions.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let dst = tmp.join(MODEL_FILE);
        std::fs::copy(model, &dst).map_err(io(model))?;
        File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(io(&dst))?;
        for (file, bytes) in extra {
            write_atomic(&tmp.join(file), bytes).map_err(io(&tmp.join(file)))?;
        }
        sync_dir(&tmp);
        let dir = versions.join(&name);
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        sync_dir(&versions);
        Ok(Version { name, dir })
    }

    /// Points `current` at `version` (atomically).
    pub fn promote(&self, version: &str) -> Result<Version> {
        let v = self.version(version)?;
        let p = self.dir.join("current");
        write_atomic(&p, format!("{version}\n").as_bytes()).map_err(io(&p))?;
        Ok(v)
    }

    /// Points `current` back: at `to`, or at the version before the current one.
    pub fn rollback(&self, to: Option<&str>) -> Result<Version> {
        let target = match to {
            Some(t) => t.to_string(),
            None => {
                let cur = self
                    .current()?
                    .ok_or_else(|| self.invalid("nothing to roll back: no current version"))?;
                let all = self.versions()?;
                let i = all.iter().position(|v| v.name == cur.name).unwrap_or(0);
                if i == 0 {
                    return Err(self.invalid(format!("{} is the oldest version", cur.name)));
                }
                all[i - 1].name.clone()
            }
        };
        self.promote(&target)
    }

    /// Takes the retrain lock without waiting; a second holder gets
    /// [`RegistryError::Locked`] naming the process that has it. The lock is an `flock`, so
    /// it goes away with the process even after kill -9.
    pub fn lock_retrain(&self) -> Result<RetrainLock> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let p = self.dir.join(".retrain.lock");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(io(&p))?;
        // SAFETY: flock on a valid open descriptor.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let holder = std::fs::read_to_string(&p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| format!(" by pid {s}"))
                .unwrap_or_default();
            return Err(RegistryError::Locked {
                dir: self.dir.display().to_string(),
                lock: p.display().to_string(),
                holder,
            });
        }
        f.set_len(0).map_err(io(&p))?;
        writeln!(f, "{}", std::process::id()).map_err(io(&p))?;
        Ok(RetrainLock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_promote_rollback_and_lock() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path().join("m")).unwrap();
        assert_eq!(r.current().unwrap(), None);
        let model = d.path().join("x.safetensors");
        std::fs::write(&model, b"weights-1").unwrap();
        let v1 = r
            .add_version(&model, &[("note.txt", b"one".to_vec())])
            .unwrap();
        assert_eq!(v1.name, "v0001");
        // Adding does not move the pointer.
        assert_eq!(r.current().unwrap(), None);
        r.promote("v0001").unwrap();
        std::fs::write(&model, b"weights-2").unwrap();
        let v2 = r.add_version(&model, &[]).unwrap();
        assert_eq!(v2.name, "v0002");
        assert_eq!(std::fs::read(v2.model()).unwrap(), b"weights-2");
        r.promote("v0002").unwrap();
        assert_eq!(r.current().unwrap().unwrap().name, "v0002");
        // No temporary names are left behind.
        let names: Vec<_> = std::fs::read_dir(r.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert_eq!(r.rollback(None).unwrap().name, "v0001");
        assert_eq!(r.current().unwrap().unwrap(), v1);
        assert!(r.rollback(None).unwrap_err().to_string().contains("oldest"));
        assert!(r.promote("v0009").is_err());
        // Readers never see a partial pointer while it moves back and forth.
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v = r.current().unwrap().unwrap().name;
                    assert!(v == "v0001" || v == "v0002", "{v}");
                    reads += 1;
                }
                reads
            });
            for i in 0..300 {
                r.promote(if i % 2 == 0 { "v0002" } else { "v0001" })
                    .unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        // The lock is exclusive and released on drop.
        let l = r.lock_retrain().unwrap();
        let e = r.lock_retrain().unwrap_err().to_string();
        assert!(
            e.contains("another retrain") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(l);
        r.lock_retrain().unwrap();
    }
}
