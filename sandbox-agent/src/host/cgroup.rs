//! Memory and process limits of isolated sandboxes, through cgroup v1: each sandbox gets
//! `<cgroup-root>/memory/nightshift/<id>/` (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes`
//! where swap accounting exists, so swap is no way around the limit) and
//! `<cgroup-root>/pids/nightshift/<id>/` (`pids.max`). The sandbox's first process joins both before it
//! execs (see [`super::isolation::IsolatedCommand::cgroup`]), so nothing of the sandbox ever runs
//! unlimited; its children inherit them. Both directories are removed at teardown, after whatever is
//! left in them has been killed.
//!
//! Memory written to tmpfs (the overlay's upper directory, the sandbox's `/tmp`) is charged to the
//! sandbox that wrote it, so the workspace's growth counts against the same limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{io_error, HostError};

/// The directory of nightshift's cgroups inside each controller's hierarchy.
const PARENT: &str = "nightshift";
/// How long to wait for the processes of a killed sandbox to leave its cgroups.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two checks for an empty cgroup.
const EMPTY_POLL: Duration = Duration::from_millis(10);

/// Limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `memory.limit_in_bytes`.
    pub memory_bytes: u64,
    /// `pids.max`: processes and threads.
    pub pids: u64,
}

impl Limits {
    /// As shown in a sandbox's info: `memory_bytes=… pids=…`.
    pub fn describe(&self) -> String {
        format!("memory_bytes={} pids={}", self.memory_bytes, self.pids)
    }
}

/// The `nightshift` directories of the memory and pids hierarchies, known to be writable.
#[derive(Debug, Clone)]
pub struct CgroupRoots {
    memory: PathBuf,
    pids: PathBuf,
}

impl CgroupRoots {
    /// Find the v1 memory and pids hierarchies under `cgroup_root` (normally `/sys/fs/cgroup`), create
    /// `nightshift/` in each, and prove that a sandbox cgroup with limits can be made and removed there.
    pub async fn probe(cgroup_root: &Path) -> Result<CgroupRoots, HostError> {
        let mut parents = Vec::new();
        for (controller, limit_file) in [("memory", "memory.limit_in_bytes"), ("pids", "pids.max")]
        {
            let hierarchy = cgroup_root.join(controller);
            if !hierarchy.join("cgroup.procs").exists() {
                return Err(HostError::Cgroup {
                    path: hierarchy,
                    reason: format!("no cgroup v1 {controller} hierarchy here"),
                });
            }
            let parent = hierarchy.join(PARENT);
            std::fs::create_dir_all(&parent).map_err(io_error("create cgroup", &parent))?;
            // Every non-root cgroup of a v1 hierarchy of this controller has its limit file.
            if !parent.join(limit_file).exists() {
                return Err(HostError::Cgroup {
                    path: hierarchy,
                    reason: format!("no cgroup v1 {controller} controller here"),
                });
            }
            parents.push(parent);
        }
        let [memory, pids] = <[PathBuf; 2]>::try_from(parents).map_err(|_| HostError::Cgroup {
            path: cgroup_root.to_owned(),
            reason: "unexpected controllers".to_owned(),
        })?;
        let roots = CgroupRoots { memory, pids };
        let probe_id = format!("probe-{}-{:08x}", std::process::id(), rand::random::<u32>());
        let probe = roots.create(
            &probe_id,
            Limits {
                memory_bytes: 64 << 20,
                pids: 16,
            },
        )?;
        probe.remove().await?;
        Ok(roots)
    }

    /// The cgroups of sandbox `id`, created with `limits`.
    pub fn create(&self, id: &str, limits: Limits) -> Result<Cgroup, HostError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(HostError::InvalidField {
                field: "cgroup name",
                reason: "letters, digits and dashes only",
            });
        }
        let cgroup = Cgroup {
            memory: self.memory.join(id),
            pids: self.pids.join(id),
        };
        let created = (|| {
            for dir in [&cgroup.memory, &cgroup.pids] {
                std::fs::create_dir(dir).map_err(io_error("create cgroup", dir))?;
            }
            write(
                &cgroup.memory.join("memory.limit_in_bytes"),
                limits.memory_bytes,
            )?;
            let memsw = cgroup.memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, limits.memory_bytes)?;
            }
            write(&cgroup.pids.join("pids.max"), limits.pids)
        })();
        match created {
            Ok(()) => Ok(cgroup),
            Err(error) => {
                for dir in [&cgroup.memory, &cgroup.pids] {
                    let _ = std::fs::remove_dir(dir);
                }
                Err(error)
            }
        }
    }

    /// The cgroups of sandbox `id` as they are on disk (after a host restart), without creating them.
    pub fn existing(&self, id: &str) -> Cgroup {
        Cgroup {
            memory: self.memory.join(id),
            pids: self.pids.join(id),
        }
    }
}

fn write(path: &Path, value: u64) -> Result<(), HostError> {
    std::fs::write(path, value.to_string()).map_err(io_error("write", path))
}

/// The two cgroups of one sandbox.
#[derive(Debug, Clone)]
pub struct Cgroup {
    memory: PathBuf,
    pids: PathBuf,
}

impl Cgroup {
    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> [PathBuf; 2] {
        [
            self.memory.join("cgroup.procs"),
            self.pids.join("cgroup.procs"),
        ]
    }

    /// The memory cgroup's directory.
    #[cfg(test)]
    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    /// The pids cgroup's directory.
    #[cfg(test)]
    pub fn pids_dir(&self) -> &Path {
        &self.pids
    }

    /// Every process in either cgroup (host pids).
    pub fn processes(&self) -> Vec<libc::pid_t> {
        let mut pids: Vec<libc::pid_t> = self
            .procs_files()
            .iter()
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|pid| *pid > 1)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILL every process in the cgroups until none is left (or [`EMPTY_TIMEOUT`] passed), then
    /// remove both directories. Missing directories are fine.
    pub async fn remove(&self) -> Result<(), HostError> {
        let deadline = tokio::time::Instant::now() + EMPTY_TIMEOUT;
        for dir in [&self.memory, &self.pids] {
            loop {
                for pid in self.processes() {
                    // SAFETY: `kill` only sends a signal; every pid here is in this sandbox's cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error) if tokio::time::Instant::now() >= deadline => {
                        return Err(io_error("remove cgroup", dir)(error));
                    }
                    // Busy: killed processes take a moment to leave.
                    Err(_) => tokio::time::sleep(EMPTY_POLL).await,
                }
            }
        }
        Ok(())
    }
}
