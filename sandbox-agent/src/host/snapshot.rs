//! Snapshots of sandboxes: a sandbox's overlay upper directory — its changes against the image it
//! started from — as a tar archive compressed with zstd, content-addressed.
//!
//! ```text
//! <data-dir>/snapshots/<sha256>.tar.zst   the archive; <sha256> is the SHA-256 of these bytes (the id)
//! <data-dir>/snapshots/<sha256>.json      {id, image_id, repo, session_id, created_ms, size_bytes, reason}
//! ```
//!
//! The archive starts with a PAX global header naming the image (`NIGHTSHIFT.image_id`), then every
//! entry of the upper directory in byte order of the paths, parents first. Entry headers carry the
//! mode, owner and mtime, so the same upper directory on the same image always gives the same bytes
//! and the same id (a second identical snapshot is the first one; its record is kept).
//!
//! Overlayfs bookkeeping survives the round trip: whiteouts (character devices 0/0, the deletions)
//! are archived as character devices and re-created with `mknod`; the overlay xattrs of directories
//! and files (`trusted.overlay.opaque`, `…redirect`, `…whiteout(s)`, and their `user.overlay.*`
//! forms used by unprivileged mounts) are PAX `SCHILY.xattr.*` records, set again with `lsetxattr`.
//! Other xattrs, sockets and device nodes other than whiteouts are not archived, nor the upper
//! directory's own mode and owner (the restore target is the caller's). A metacopy upper
//! (`trusted.overlay.metacopy`: data still in the lower) is refused, since its files hold no data.
//! Mount a restored upper directory with the options of the original (`redirect_dir`, `userxattr`).
//!
//! Restore policy: a snapshot names its image, and restoring uses exactly that image — the upper
//! directory is a delta against that tree and means nothing on another one. Images are kept while a
//! snapshot names them ([`Images::pin`]), so this normally succeeds; if the image is gone all the
//! same (its tmpfs tree did not survive a reboot), [`Snapshots::restore`] refuses with
//! [`SnapshotError::ImageGone`] (`snapshot_image_gone`) rather than rebasing the changes onto a newer
//! image. The restore holds an [`ImageLease`] on the image, so it cannot be retired under the sandbox.
//!
//! Snapshots never contain secrets: only the upper directory is read, never through symlinks, and
//! [`Snapshots::snapshot`] refuses an upper directory that contains one of the caller's private
//! paths (the sandbox's HOME and the agent's state directory, which live outside the workspace).
//! Restoring checks the archive's SHA-256 against its id before unpacking, and accepts only
//! relative paths below directories it created itself, so a damaged or crafted archive cannot write
//! outside the target.
//!
//! Snapshot and restore are blocking filesystem work: call them from `spawn_blocking`. Take a
//! snapshot of a quiescent sandbox (its agent idle or frozen): a file that changes while it is
//! archived is recorded torn (padded or cut to its size when it was listed).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek as _, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nightshift_protocol::provider::SnapshotInfo;
use sha2::{Digest, Sha256};

use super::image::{ImageError, ImageLease, Images};

/// zstd level of the archives: the fastest, and source trees still shrink several times (a light
/// session's archive is mostly the git index and new git objects, which no level shrinks much).
const ZSTD_LEVEL: i32 = 1;
/// zstd compresses on this many threads of its own, while the calling thread walks and reads the
/// upper directory. With one or more, the output depends only on the level and the job size.
const ZSTD_WORKERS: u32 = 1;
/// Input per zstd job (its minimum): compression starts after this much tar, not at the end.
const ZSTD_JOB_BYTES: u32 = 512 * 1024;
/// Restored files (each at most [`QUEUED_FILE_MAX_BYTES`]) queued for the writer thread at most.
const FILES_IN_FLIGHT: usize = 64;
/// Larger files are restored by the unpacking thread itself, streamed, never held in memory.
const QUEUED_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// tar writes (and reads) 512-byte headers and small pieces; zstd gets (and gives) chunks of this size.
const TAR_BUFFER_BYTES: usize = 128 * 1024;
/// PAX record naming the image in the archive's global header.
const PAX_IMAGE_ID: &str = "NIGHTSHIFT.image_id";
/// Prefix of the PAX records holding xattrs (as GNU tar and libarchive write them).
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// The xattrs that carry overlayfs state and are archived (on directories and files).
const OVERLAY_XATTRS: [&str; 8] = [
    "trusted.overlay.opaque",
    "trusted.overlay.redirect",
    "trusted.overlay.whiteout",
    "trusted.overlay.whiteouts",
    "user.overlay.opaque",
    "user.overlay.redirect",
    "user.overlay.whiteout",
    "user.overlay.whiteouts",
];
/// Xattrs that mark a metacopy file (its data is still in the lower): such an upper is refused.
const METACOPY_XATTRS: [&str; 2] = ["trusted.overlay.metacopy", "user.overlay.metacopy"];
/// Longest accepted `reason`, in characters.
const MAX_REASON_CHARS: usize = 200;

/// Everything that can go wrong with snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot with this id.
    #[error("snapshot {id} not found")]
    NotFound {
        /// The id asked for (truncated).
        id: String,
    },
    /// The image the snapshot was taken on is gone (retired or lost); restoring is refused.
    #[error("image {image_id} of snapshot {snapshot_id} is gone; the snapshot cannot be restored")]
    ImageGone {
        /// The snapshot.
        snapshot_id: String,
        /// The image it names.
        image_id: String,
    },
    /// A field of the snapshot's description is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The upper directory contains a path that must never be archived (HOME, the agent's state).
    #[error("upper directory {upper} contains the private path {private}")]
    PrivatePathInUpper {
        /// The upper directory.
        upper: PathBuf,
        /// The private path inside it.
        private: PathBuf,
    },
    /// The upper directory holds something a snapshot cannot represent.
    #[error("cannot snapshot {path}: {reason}")]
    Unsupported {
        /// The offending entry.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The restore target is not an empty directory.
    #[error("restore target {path} is not empty")]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// The archive is damaged or not one of ours.
    #[error("snapshot {id} is corrupt: {reason}")]
    Corrupt {
        /// The snapshot.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}

/// What a snapshot records besides its content.
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    /// The image the upper directory is a delta against.
    pub image_id: String,
    /// Repository, `owner/name`.
    pub repo: String,
    /// Session of the sandbox.
    pub session_id: String,
    /// Why it is taken.
    pub reason: String,
    /// Paths that must not be inside the upper directory (the sandbox's HOME, the agent's state
    /// directory); the snapshot is refused if one is.
    pub private_paths: Vec<PathBuf>,
}

/// A restored snapshot: its record, and a lease on the image to mount under it as the lower.
#[derive(Debug)]
pub struct Restored {
    /// The snapshot.
    pub snapshot: SnapshotInfo,
    /// The image it applies to, kept from retirement while this lease lives.
    pub image: ImageLease,
}

/// The snapshot store, `<data-dir>/snapshots`, and an index of its records.
pub struct Snapshots {
    root: PathBuf,
    images: Images,
    index: Mutex<HashMap<String, SnapshotInfo>>,
}

impl Snapshots {
    /// Open (create) the store at `root`, read its records, and pin every image a snapshot names so
    /// it is never retired. Call before any image build, so no named image is retired first.
    pub fn open(root: &Path, images: Images) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(root).map_err(io_error("create directory", root))?;
        let mut index = HashMap::new();
        for entry in std::fs::read_dir(root).map_err(io_error("read directory", root))? {
            let entry = entry.map_err(io_error("read directory", root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path()); // an interrupted snapshot
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !is_snapshot_id(id) {
                continue;
            }
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<SnapshotInfo>(&bytes).ok());
            match record {
                Some(info) if info.id == id => {
                    images.pin(&info.image_id);
                    index.insert(info.id.clone(), info);
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "skipping unreadable snapshot record")
                }
            }
        }
        Ok(Snapshots {
            root: root.to_owned(),
            images,
            index: Mutex::new(index),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SnapshotInfo>> {
        // Every update is a single insert: a panic elsewhere leaves the index usable.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The record of snapshot `id`.
    pub fn get(&self, id: &str) -> Option<SnapshotInfo> {
        self.lock().get(id).cloned()
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let mut all: Vec<SnapshotInfo> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        all
    }

    /// Archive `upper` (an overlay upper directory: the delta against image `meta.image_id`) into the
    /// store. Identical content on the same image is the same snapshot: its existing record is
    /// returned.
    pub fn snapshot(
        &self,
        upper: &Path,
        meta: SnapshotMeta,
    ) -> Result<SnapshotInfo, SnapshotError> {
        validate_meta(&meta)?;
        let upper = upper.canonicalize().map_err(io_error("resolve", upper))?;
        if !upper.is_dir() {
            return Err(SnapshotError::Unsupported {
                path: upper,
                reason: "not a directory",
            });
        }
        for private in &meta.private_paths {
            let private = private.canonicalize().unwrap_or_else(|_| private.clone());
            if private.starts_with(&upper) {
                return Err(SnapshotError::PrivatePathInUpper { upper, private });
            }
        }

        let temporary = self.root.join(format!(
            ".tmp-{}.tar.zst",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let archiving = std::time::Instant::now();
        let written = write_archive(&upper, &meta.image_id, &temporary);
        let archive_ms = archiving.elapsed().as_millis() as u64;
        let (id, size_bytes) = match written {
            Ok(done) => done,
            Err(err) => {
                let _ = std::fs::remove_file(&temporary);
                return Err(err);
            }
        };
        tracing::info!(session_id = %meta.session_id, archive_ms, size_bytes, "snapshot archived");
        let archive = self.archive_path(&id);
        if archive.exists() {
            let _ = std::fs::remove_file(&temporary); // the same bytes are already stored
        } else {
            std::fs::rename(&temporary, &archive).map_err(io_error("move into place", &archive))?;
        }
        if let Some(existing) = self.get(&id) {
            return Ok(existing);
        }
        let info = SnapshotInfo {
            id: id.clone(),
            image_id: meta.image_id,
            repo: meta.repo,
            session_id: meta.session_id,
            created_ms: now_ms(),
            size_bytes,
            reason: meta.reason,
        };
        // Pin first: from here on the image must outlive the snapshot.
        self.images.pin(&info.image_id);
        let record = self.root.join(format!("{id}.json"));
        super::write_json_atomically(&record, &info).map_err(io_error("write", &record))?;
        Ok(self.lock().entry(id).or_insert(info).clone())
    }

    /// Restore snapshot `snapshot_id` into `into_upper` (created if missing; must be empty), to be
    /// mounted as the upper directory over the image in the returned lease. Refused with
    /// [`SnapshotError::ImageGone`] when that image no longer exists (see the module doc).
    pub fn restore(&self, snapshot_id: &str, into_upper: &Path) -> Result<Restored, SnapshotError> {
        let info = self
            .get(snapshot_id)
            .ok_or_else(|| SnapshotError::NotFound {
                id: crate::seed::truncate(snapshot_id, 80),
            })?;
        let image = self.images.lease(&info.image_id).map_err(|err| match err {
            ImageError::NotFound { .. } | ImageError::NotReady { .. } => SnapshotError::ImageGone {
                snapshot_id: info.id.clone(),
                image_id: info.image_id.clone(),
            },
            other => SnapshotError::Corrupt {
                id: info.id.clone(),
                reason: other.to_string(),
            },
        })?;
        if !image.tree_path().is_dir() {
            return Err(SnapshotError::ImageGone {
                snapshot_id: info.id,
                image_id: info.image_id,
            });
        }
        std::fs::create_dir_all(into_upper).map_err(io_error("create directory", into_upper))?;
        let mut contents =
            std::fs::read_dir(into_upper).map_err(io_error("read directory", into_upper))?;
        if contents.next().is_some() {
            return Err(SnapshotError::TargetNotEmpty {
                path: into_upper.to_owned(),
            });
        }
        let unpacking = std::time::Instant::now();
        if let Err(err) = read_archive(&self.archive_path(&info.id), &info, into_upper) {
            empty_directory(into_upper);
            return Err(err);
        }
        tracing::info!(
            snapshot_id = %info.id,
            unpack_ms = unpacking.elapsed().as_millis() as u64,
            size_bytes = info.size_bytes,
            "snapshot unpacked"
        );
        Ok(Restored {
            snapshot: info,
            image,
        })
    }

    /// The image ids snapshots name.
    pub fn image_ids(&self) -> HashSet<String> {
        self.lock().values().map(|s| s.image_id.clone()).collect()
    }

    fn archive_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.tar.zst"))
    }
}

/// Whether `id` looks like a snapshot id (64 lowercase hex digits), so it is safe in a path.
pub fn is_snapshot_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn validate_meta(meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let printable =
        |text: &str, max: usize| text.chars().count() <= max && !text.chars().any(char::is_control);
    if meta.image_id.is_empty() || !printable(&meta.image_id, 100) {
        return Err(SnapshotError::InvalidField {
            field: "image_id",
            reason: "1 to 100 printable characters",
        });
    }
    if !printable(&meta.reason, MAX_REASON_CHARS) {
        return Err(SnapshotError::InvalidField {
            field: "reason",
            reason: "at most 200 printable characters",
        });
    }
    if !printable(&meta.session_id, 200) || !printable(&meta.repo, 250) {
        return Err(SnapshotError::InvalidField {
            field: "session_id",
            reason: "at most 200 printable characters",
        });
    }
    Ok(())
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written_bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let done = buf.get(..n).unwrap_or(buf);
        self.hasher.update(done);
        self.written_bytes += done.len() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write the archive of `upper` to `path`; returns its SHA-256 (hex) and size.
fn write_archive(
    upper: &Path,
    image_id: &str,
    path: &Path,
) -> Result<(String, u64), SnapshotError> {
    let file = File::create(path).map_err(io_error("create", path))?;
    let hashing = HashingWriter {
        inner: BufWriter::with_capacity(256 * 1024, file),
        hasher: Sha256::new(),
        written_bytes: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::new(hashing, ZSTD_LEVEL)
        .map_err(io_error("start compressing", path))?;
    encoder
        .multithread(ZSTD_WORKERS)
        .and_then(|()| {
            encoder.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_BYTES))
        })
        .map_err(io_error("start compressing", path))?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(TAR_BUFFER_BYTES, encoder));
    append_pax(
        &mut builder,
        tar::EntryType::XGlobalHeader,
        &[(PAX_IMAGE_ID.as_bytes(), image_id.as_bytes())],
    )
    .map_err(io_error("write", path))?;
    append_tree(&mut builder, upper, Path::new(""))?;
    let encoder = builder
        .into_inner()
        .map_err(io_error("write", path))?
        .into_inner()
        .map_err(|err| io_error("write", path)(err.into_error()))?;
    let mut hashing = encoder
        .finish()
        .map_err(io_error("finish compressing", path))?;
    hashing.flush().map_err(io_error("write", path))?;
    Ok((
        hex::encode(hashing.hasher.finalize()),
        hashing.written_bytes,
    ))
}

/// Append the entries below `dir` (`relative` inside the upper directory), in byte order, each
/// directory before its contents.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    relative: &Path,
) -> Result<(), SnapshotError> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .map_err(io_error("read directory", dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_error("read directory", dir))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let path = dir.join(&name);
        let relative = relative.join(&name);
        let metadata = std::fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?;
        let file_type = metadata.file_type();
        let xattrs = overlay_xattrs(&path)?;
        let mut header = header_for(&metadata);
        let written = if file_type.is_dir() {
            append_xattrs(builder, &xattrs)
                .and_then(|()| {
                    header.set_entry_type(tar::EntryType::Directory);
                    builder.append_data(&mut header, &relative, io::empty())
                })
                .map_err(io_error("archive", &path))?;
            append_tree(builder, &path, &relative)?;
            continue;
        } else if file_type.is_file() {
            if xattrs
                .iter()
                .any(|(name, _)| METACOPY_XATTRS.contains(&name.as_str()))
            {
                return Err(SnapshotError::Unsupported {
                    path,
                    reason: "metacopy file (mount the overlay without metacopy=on)",
                });
            }
            let file = File::open(&path).map_err(io_error("open", &path))?;
            let size_bytes = metadata.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size_bytes);
            // Exactly `size_bytes`, even if the file changes meanwhile (see the module doc).
            let data = file.take(size_bytes).chain(io::repeat(0)).take(size_bytes);
            append_xattrs(builder, &xattrs)
                .and_then(|()| builder.append_data(&mut header, &relative, data))
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_error("read link", &path))?;
            header.set_entry_type(tar::EntryType::Symlink);
            append_xattrs(builder, &xattrs)
                .and_then(|()| builder.append_link(&mut header, &relative, &target))
        } else if file_type.is_char_device() && metadata.rdev() == 0 {
            // A whiteout: the path was deleted in the merged view.
            header.set_entry_type(tar::EntryType::Char);
            header
                .set_device_major(0)
                .and_then(|()| header.set_device_minor(0))
                .and_then(|()| append_xattrs(builder, &xattrs))
                .and_then(|()| builder.append_data(&mut header, &relative, io::empty()))
        } else if file_type.is_fifo() {
            header.set_entry_type(tar::EntryType::Fifo);
            append_xattrs(builder, &xattrs)
                .and_then(|()| builder.append_data(&mut header, &relative, io::empty()))
        } else {
            tracing::warn!(path = %path.display(), "not archiving a socket or device node");
            Ok(())
        };
        written.map_err(io_error("archive", &path))?;
    }
    Ok(())
}

/// A header with the entry's mode, owner and mtime; no user or group names, no access time.
fn header_for(metadata: &std::fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(metadata.mode() & 0o7777);
    header.set_uid(u64::from(metadata.uid()));
    header.set_gid(u64::from(metadata.gid()));
    header.set_mtime(u64::try_from(metadata.mtime()).unwrap_or(0));
    header.set_size(0);
    header
}

/// A PAX extended header (`x`, for the next entry; `g`, global) holding `records`.
fn append_pax<W: Write>(
    builder: &mut tar::Builder<W>,
    kind: tar::EntryType,
    records: &[(&[u8], &[u8])],
) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        // "<length> <key>=<value>\n", where the length counts itself.
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut length = rest + 1;
        while length != rest + length.to_string().len() {
            length = rest + length.to_string().len();
        }
        data.extend_from_slice(length.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key);
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    builder.append_data(&mut header, "pax_header", data.as_slice())
}

fn append_xattrs<W: Write>(
    builder: &mut tar::Builder<W>,
    xattrs: &[(String, Vec<u8>)],
) -> io::Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = xattrs
        .iter()
        .map(|(name, _)| format!("{PAX_XATTR_PREFIX}{name}"))
        .collect();
    let records: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(xattrs)
        .map(|(key, (_, value))| (key.as_bytes(), value.as_slice()))
        .collect();
    append_pax(builder, tar::EntryType::XHeader, &records)
}

fn c_path(path: &Path) -> Result<CString, SnapshotError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SnapshotError::Unsupported {
        path: path.to_owned(),
        reason: "path contains a NUL byte",
    })
}

/// The overlay xattrs (and metacopy markers) of `path`, sorted by name; never follows a symlink.
fn overlay_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let c_path = c_path(path)?;
    let mut names = vec![0u8; 1024];
    // SAFETY: `c_path` is NUL-terminated; `names` is a writable buffer of the given length.
    let length =
        unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let length = match usize::try_from(length) {
        Ok(length) => length,
        Err(_) => {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                // More names than fit: none of ours is that long, but a file may carry many others.
                Some(libc::ERANGE) => wanted_xattrs_one_by_one(&c_path, path),
                _ => Err(io_error("list xattrs of", path)(err)),
            };
        }
    };
    let mut found = Vec::new();
    for name in names.get(..length).unwrap_or_default().split(|b| *b == 0) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if OVERLAY_XATTRS.contains(&name) || METACOPY_XATTRS.contains(&name) {
            if let Some(value) = get_xattr(&c_path, name, path)? {
                found.push((name.to_owned(), value));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn wanted_xattrs_one_by_one(
    c_path: &CString,
    path: &Path,
) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let mut found = Vec::new();
    for name in OVERLAY_XATTRS.iter().chain(METACOPY_XATTRS.iter()) {
        if let Some(value) = get_xattr(c_path, name, path)? {
            found.push(((*name).to_owned(), value));
        }
    }
    found.sort();
    Ok(found)
}

fn get_xattr(c_path: &CString, name: &str, path: &Path) -> Result<Option<Vec<u8>>, SnapshotError> {
    let c_name = CString::new(name).map_err(|_| SnapshotError::Unsupported {
        path: path.to_owned(),
        reason: "xattr name contains a NUL byte",
    })?;
    let mut value = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; `value` is a writable buffer of the given length.
    let length = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    match usize::try_from(length) {
        Ok(length) => {
            value.truncate(length);
            Ok(Some(value))
        }
        Err(_) => {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENODATA | libc::ENOTSUP) => Ok(None),
                _ => Err(io_error("read xattr of", path)(err)),
            }
        }
    }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<(), SnapshotError> {
    let c_path = c_path(path)?;
    let c_name = CString::new(name).map_err(|_| SnapshotError::Unsupported {
        path: path.to_owned(),
        reason: "xattr name contains a NUL byte",
    })?;
    // SAFETY: both strings are NUL-terminated; `value` is readable for its length.
    let result = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io_error("set xattr on", path)(io::Error::last_os_error()))
    }
}

/// `mknod` a whiteout (character device 0/0) or a FIFO.
fn make_node(path: &Path, kind: libc::mode_t, mode: u32) -> Result<(), SnapshotError> {
    let c_path = c_path(path)?;
    let mode = libc::mode_t::try_from(mode & 0o7777).unwrap_or(0);
    // SAFETY: `c_path` is NUL-terminated; device 0/0 is the overlayfs whiteout (or unused for FIFOs).
    let result = unsafe { libc::mknod(c_path.as_ptr(), kind | mode, 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(io_error("create node", path)(io::Error::last_os_error()))
    }
}

/// Set the modification time of `path` itself (never a symlink's target); the access time is left.
fn set_mtime(path: &Path, mtime_s: u64) -> Result<(), SnapshotError> {
    let c_path = c_path(path)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: libc::time_t::try_from(mtime_s).unwrap_or(libc::time_t::MAX),
            tv_nsec: 0,
        },
    ];
    // SAFETY: `c_path` is NUL-terminated and `times` holds the two timespecs utimensat reads.
    let result = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io_error("set mtime of", path)(io::Error::last_os_error()))
    }
}

/// A directory restored, whose mode and mtime are set once its contents are in place.
struct RestoredDir {
    path: PathBuf,
    mode: u32,
    mtime: u64,
    owner: (u32, u32),
}

/// Unpack the archive of `info` into the empty directory `into`, after checking its SHA-256 against
/// the id (a damaged archive is never unpacked).
fn read_archive(path: &Path, info: &SnapshotInfo, into: &Path) -> Result<(), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        id: info.id.clone(),
        reason,
    };
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_error("read", path))?;
    let digest = hex::encode(hasher.finalize());
    if digest != info.id {
        return Err(corrupt(format!("content hash is {digest}")));
    }
    file.seek(io::SeekFrom::Start(0))
        .map_err(io_error("read", path))?;
    let decoder =
        zstd::stream::read::Decoder::new(file).map_err(io_error("start decompressing", path))?;
    // tar reads 512-byte headers: each from a buffer, not from a decompression call of its own.
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(TAR_BUFFER_BYTES, decoder));
    // This thread decompresses, checks and makes directories; a writer thread makes the files.
    let (dirs, image_id) = std::thread::scope(|scope| {
        let (files, queued) = std::sync::mpsc::sync_channel::<RestoredFile>(FILES_IN_FLIGHT);
        let writer = scope.spawn(move || -> Result<(), SnapshotError> {
            for file in queued {
                file.write()?;
            }
            Ok(())
        });
        let unpacked = unpack_entries(&mut archive, info, into, &files);
        drop(files);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(corrupt("the file writer stopped unexpectedly".to_owned())));
        // The writer's error explains why the unpacking stopped.
        written.and(unpacked)
    })?;
    let as_root = is_root();
    // Directories last, deepest first: their contents no longer change their mtime.
    for dir in dirs.iter().rev() {
        if as_root {
            std::os::unix::fs::lchown(&dir.path, Some(dir.owner.0), Some(dir.owner.1))
                .map_err(io_error("change owner of", &dir.path))?;
        }
        std::fs::set_permissions(
            &dir.path,
            std::fs::Permissions::from_mode(dir.mode & 0o7777),
        )
        .map_err(io_error("set permissions of", &dir.path))?;
        set_mtime(&dir.path, dir.mtime)?;
    }
    if image_id.as_deref() != Some(info.image_id.as_str()) {
        return Err(corrupt("the archive names another image".to_owned()));
    }
    Ok(())
}

/// A regular file of an archive, read into memory, for the writer thread.
struct RestoredFile {
    target: PathBuf,
    data: Vec<u8>,
    mode: u32,
    mtime: u64,
    /// Set when restoring as root.
    owner: Option<(u32, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl RestoredFile {
    /// Create the file (it must not exist) with its contents, owner, mode, xattrs and mtime.
    fn write(self) -> Result<(), SnapshotError> {
        let target = &self.target;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map_err(io_error("create", target))?;
        file.write_all(&self.data)
            .map_err(io_error("write", target))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(io_error("change owner of", target))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(self.mode & 0o7777))
            .map_err(io_error("set permissions of", target))?;
        // Through the open file: no second lookup of its path (xattrs leave the mtime).
        file.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(self.mtime))
            .map_err(io_error("set mtime of", target))?;
        for (name, value) in &self.xattrs {
            set_xattr(target, name, value)?;
        }
        Ok(())
    }
}

/// Unpack the entries of `archive` into `into`: directories, symlinks and whiteouts here, regular
/// files up to [`QUEUED_FILE_MAX_BYTES`] sent to `files` (the writer), larger ones here. Returns
/// the directories made, whose owner, mode and mtime are set last, and the image the archive names.
fn unpack_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    info: &SnapshotInfo,
    into: &Path,
    files: &std::sync::mpsc::SyncSender<RestoredFile>,
) -> Result<(Vec<RestoredDir>, Option<String>), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        id: info.id.clone(),
        reason,
    };
    let as_root = is_root();
    // Relative directories created so far: every entry's parent must be one of them, so nothing is
    // ever written through a symlink or outside `into`.
    let mut made: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut dirs: Vec<RestoredDir> = Vec::new();
    let mut image_id: Option<String> = None;
    let entries = archive.entries().map_err(|err| corrupt(err.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|err| corrupt(err.to_string()))?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            if let Some(records) = entry
                .pax_extensions()
                .map_err(|err| corrupt(err.to_string()))?
            {
                for record in records {
                    let record = record.map_err(|err| corrupt(err.to_string()))?;
                    if record.key_bytes() == PAX_IMAGE_ID.as_bytes() {
                        image_id = Some(String::from_utf8_lossy(record.value_bytes()).into_owned());
                    }
                }
            }
            continue;
        }
        let relative = entry
            .path()
            .map_err(|err| corrupt(err.to_string()))?
            .into_owned();
        let relative = clean_relative(&relative)
            .ok_or_else(|| corrupt(format!("unsafe path {}", relative.display())))?;
        let parent = relative.parent().map(Path::to_owned).unwrap_or_default();
        if !made.contains(&parent) {
            return Err(corrupt(format!(
                "{} comes before its directory",
                relative.display()
            )));
        }
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(records) = entry
            .pax_extensions()
            .map_err(|err| corrupt(err.to_string()))?
        {
            for record in records {
                let record = record.map_err(|err| corrupt(err.to_string()))?;
                let Ok(key) = record.key() else { continue };
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    if OVERLAY_XATTRS.contains(&name) {
                        xattrs.push((name.to_owned(), record.value_bytes().to_vec()));
                    }
                }
            }
        }
        let header = entry.header();
        let mode = header.mode().map_err(|err| corrupt(err.to_string()))?;
        let mtime = header.mtime().map_err(|err| corrupt(err.to_string()))?;
        let owner = (
            u32::try_from(header.uid().map_err(|err| corrupt(err.to_string()))?).unwrap_or(0),
            u32::try_from(header.gid().map_err(|err| corrupt(err.to_string()))?).unwrap_or(0),
        );
        let target = into.join(&relative);
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir(&target).map_err(io_error("create directory", &target))?;
                made.insert(relative);
                dirs.push(RestoredDir {
                    path: target.clone(),
                    mode,
                    mtime,
                    owner,
                });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous
                if entry.size() <= QUEUED_FILE_MAX_BYTES =>
            {
                let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
                entry
                    .read_to_end(&mut data)
                    .map_err(|err| corrupt(err.to_string()))?;
                let file = RestoredFile {
                    target,
                    data,
                    mode,
                    mtime,
                    owner: as_root.then_some(owner),
                    xattrs,
                };
                if files.send(file).is_err() {
                    // The writer failed; its error is the one reported.
                    return Ok((dirs, image_id));
                }
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_error("create", &target))?;
                io::copy(&mut entry, &mut file).map_err(io_error("write", &target))?;
                if as_root {
                    std::os::unix::fs::fchown(&file, Some(owner.0), Some(owner.1))
                        .map_err(io_error("change owner of", &target))?;
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io_error("set permissions of", &target))?;
                // Through the open file: no second lookup of its path (xattrs leave the mtime).
                file.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(mtime))
                    .map_err(io_error("set mtime of", &target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|err| corrupt(err.to_string()))?
                    .ok_or_else(|| {
                        corrupt(format!("symlink {} without target", relative.display()))
                    })?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(io_error("create symlink", &target))?;
                if as_root {
                    std::os::unix::fs::lchown(&target, Some(owner.0), Some(owner.1))
                        .map_err(io_error("change owner of", &target))?;
                }
            }
            tar::EntryType::Char => {
                let device = (
                    header
                        .device_major()
                        .map_err(|err| corrupt(err.to_string()))?,
                    header
                        .device_minor()
                        .map_err(|err| corrupt(err.to_string()))?,
                );
                if device != (Some(0), Some(0)) {
                    return Err(corrupt(format!(
                        "device node {} is not a whiteout",
                        relative.display()
                    )));
                }
                make_node(&target, libc::S_IFCHR, mode)?;
                if as_root {
                    std::os::unix::fs::lchown(&target, Some(owner.0), Some(owner.1))
                        .map_err(io_error("change owner of", &target))?;
                }
            }
            tar::EntryType::Fifo => make_node(&target, libc::S_IFIFO, mode)?,
            other => {
                return Err(corrupt(format!(
                    "unexpected entry type {other:?} at {}",
                    relative.display()
                )))
            }
        }
        for (name, value) in &xattrs {
            set_xattr(&target, name, value)?;
        }
        if !matches!(
            kind,
            tar::EntryType::Directory | tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            set_mtime(&target, mtime)?;
        }
    }
    Ok((dirs, image_id))
}

/// `path` with only normal components (no root, `.`, `..`), or `None`; never empty.
fn clean_relative(path: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Remove everything inside `dir` (after a failed restore), leaving it empty.
fn empty_directory(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(error) = removed {
                tracing::warn!(path = %path.display(), %error, "could not clean up a failed restore");
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nightshift_protocol::provider::ImageStatus;

    use super::*;
    use crate::host::image::tests::{git, Fixture};
    use crate::host::image::ImageSettings;

    fn meta(image_id: &str) -> SnapshotMeta {
        SnapshotMeta {
            image_id: image_id.to_owned(),
            repo: "demo/hello".to_owned(),
            session_id: "session-1".to_owned(),
            reason: "prompt_finished".to_owned(),
            private_paths: Vec::new(),
        }
    }

    fn snapshots_of(fixture: &Fixture, images: &Images) -> Snapshots {
        Snapshots::open(&fixture.dir.path().join("snapshots"), images.clone()).unwrap()
    }

    /// An overlay mount, unmounted when dropped.
    struct Overlay {
        merged: CString,
    }

    impl Overlay {
        fn mount(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Self {
            for dir in [upper, work, merged] {
                std::fs::create_dir_all(dir).unwrap();
            }
            let options = CString::new(format!(
                "lowerdir={},upperdir={},workdir={},redirect_dir=on",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .unwrap();
            let target = c_path(merged).unwrap();
            // SAFETY: every pointer is a NUL-terminated string that outlives the call.
            let result = unsafe {
                libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    0,
                    options.as_ptr().cast(),
                )
            };
            assert_eq!(result, 0, "mount overlay: {}", io::Error::last_os_error());
            Overlay { merged: target }
        }
    }

    impl Drop for Overlay {
        fn drop(&mut self) {
            // SAFETY: `merged` is a NUL-terminated path this test mounted. A busy mount is detached
            // lazily, so a test never leaves a mount behind.
            unsafe {
                if libc::umount2(self.merged.as_ptr(), 0) != 0 {
                    libc::umount2(self.merged.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }

    /// Every entry below `root`: kind, mode, contents (or target, or device) and overlay xattrs.
    fn view(root: &Path) -> BTreeMap<String, String> {
        let mut seen = BTreeMap::new();
        let mut pending = vec![PathBuf::new()];
        while let Some(relative) = pending.pop() {
            for entry in std::fs::read_dir(root.join(&relative)).unwrap() {
                let relative = relative.join(entry.unwrap().file_name());
                let path = root.join(&relative);
                let metadata = std::fs::symlink_metadata(&path).unwrap();
                let mode = metadata.mode() & 0o7777;
                let kind = metadata.file_type();
                let what = if kind.is_dir() {
                    pending.push(relative.clone());
                    format!("dir {mode:o}")
                } else if kind.is_file() {
                    let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
                    format!("file {mode:o} {digest}")
                } else if kind.is_symlink() {
                    format!("link {}", std::fs::read_link(&path).unwrap().display())
                } else if kind.is_char_device() {
                    format!("char {mode:o} {}", metadata.rdev())
                } else {
                    format!("other {mode:o}")
                };
                let xattrs: Vec<String> = overlay_xattrs(&path)
                    .unwrap()
                    .into_iter()
                    .map(|(name, value)| format!("{name}={}", String::from_utf8_lossy(&value)))
                    .collect();
                seen.insert(relative.display().to_string(), format!("{what} {xattrs:?}"));
            }
        }
        seen
    }

    /// The paths an archive holds (besides its global header).
    fn archived_paths(path: &Path) -> Vec<String> {
        let decoder = zstd::stream::read::Decoder::new(File::open(path).unwrap()).unwrap();
        let mut archive = tar::Archive::new(decoder);
        let mut paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.header().entry_type() != tar::EntryType::XGlobalHeader)
            .map(|entry| entry.path().unwrap().display().to_string())
            .collect();
        paths.sort();
        paths
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlay_round_trip_keeps_edits_additions_and_deletions() {
        if !is_root() {
            eprintln!("skipped: mounting overlayfs needs root");
            return;
        }
        let fixture = Fixture::new(ImageSettings::default());
        fixture.commit(
            "Layout",
            &[
                ("docs/a.md", "a\n"),
                ("docs/b.md", "b\n"),
                ("olddir/x.txt", "x\n"),
                ("olddir/sub/y.txt", "y\n"),
                ("keep/k.txt", "k\n"),
                ("movedir/m.txt", "m\n"),
            ],
        );
        let image = fixture.build_ok(None).await;
        let lower = fixture.images.tree_path(&image);
        let snapshots = snapshots_of(&fixture, &fixture.images);
        let scratch = tempfile::tempdir_in(fixture.dir.path()).unwrap();
        let at = |name: &str| scratch.path().join(name);

        let (before, original_upper, info) = {
            let _mounted = Overlay::mount(&lower, &at("upper1"), &at("work1"), &at("merged1"));
            let merged = at("merged1");
            std::fs::write(merged.join("README.md"), "edited\n").unwrap();
            std::fs::write(merged.join("new.txt"), "new\n").unwrap();
            std::fs::create_dir(merged.join("newdir")).unwrap();
            std::fs::write(merged.join("newdir/n.txt"), "n\n").unwrap();
            std::fs::remove_file(merged.join("hello/__main__.py")).unwrap();
            std::fs::remove_dir_all(merged.join("olddir")).unwrap();
            std::fs::remove_dir_all(merged.join("docs")).unwrap();
            std::fs::create_dir(merged.join("docs")).unwrap();
            std::fs::write(merged.join("docs/c.md"), "c\n").unwrap();
            std::fs::rename(merged.join("movedir"), merged.join("moved")).unwrap();
            std::os::unix::fs::symlink("README.md", merged.join("link")).unwrap();
            std::fs::set_permissions(
                merged.join("keep/k.txt"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            git(&merged, &["add", "README.md", "new.txt"]);

            // What overlayfs wrote: whiteouts, an opaque directory, a redirect.
            let upper = view(&at("upper1"));
            assert!(
                upper["hello/__main__.py"].starts_with("char 0 0"),
                "{upper:#?}"
            );
            assert!(upper["olddir"].starts_with("char 0 0"), "{upper:#?}");
            assert!(
                upper["docs"].contains("trusted.overlay.opaque=y"),
                "{upper:#?}"
            );
            assert!(
                upper["moved"].contains("trusted.overlay.redirect="),
                "{upper:#?}"
            );
            assert!(!upper.contains_key("docs/a.md") && !upper.contains_key("tests"));

            // Taken while mounted, as from a live sandbox.
            let info = snapshots.snapshot(&at("upper1"), meta(&image.id)).unwrap();
            (view(&merged), upper, info)
        };
        assert!(is_snapshot_id(&info.id));
        assert_eq!(info.image_id, image.id);
        let archive = fixture
            .dir
            .path()
            .join(format!("snapshots/{}.tar.zst", info.id));
        assert_eq!(std::fs::metadata(&archive).unwrap().len(), info.size_bytes);
        // Only the workspace's delta is archived: exactly the upper directory's entries.
        let upper_paths: Vec<String> = original_upper.keys().cloned().collect();
        assert_eq!(archived_paths(&archive), upper_paths);

        let restored = snapshots.restore(&info.id, &at("upper2")).unwrap();
        assert_eq!(restored.snapshot, info);
        assert_eq!(restored.image.tree_path(), lower);
        // The restored upper directory is the original one, overlay xattrs and whiteouts included,
        // and archives to the same snapshot.
        assert_eq!(view(&at("upper2")), original_upper);
        let again = snapshots.snapshot(&at("upper2"), meta(&image.id)).unwrap();
        assert_eq!(again.id, info.id);

        let _mounted = Overlay::mount(&lower, &at("upper2"), &at("work2"), &at("merged2"));
        let merged = at("merged2");
        assert_eq!(view(&merged), before);
        assert_eq!(
            std::fs::read_to_string(merged.join("README.md")).unwrap(),
            "edited\n"
        );
        assert_eq!(
            std::fs::read_to_string(merged.join("docs/c.md")).unwrap(),
            "c\n"
        );
        assert_eq!(
            std::fs::read_to_string(merged.join("moved/m.txt")).unwrap(),
            "m\n"
        );
        for deleted in [
            "hello/__main__.py",
            "olddir",
            "docs/a.md",
            "docs/b.md",
            "movedir",
        ] {
            assert!(!merged.join(deleted).exists(), "{deleted} is back");
        }
        assert!(merged.join("tests/test_greet.py").is_file());
        let status = git(&merged, &["status", "--porcelain"]);
        assert!(
            status.contains("M  README.md") && status.contains("A  new.txt"),
            "{status}"
        );
        assert!(status.contains(" D hello/__main__.py"), "{status}");
    }

    #[tokio::test]
    async fn the_same_changes_on_the_same_image_are_the_same_snapshot() {
        let fixture = Fixture::new(ImageSettings::default());
        let snapshots = snapshots_of(&fixture, &fixture.images);
        let upper = tempfile::tempdir_in(fixture.dir.path()).unwrap();
        std::fs::create_dir_all(upper.path().join("src/deep")).unwrap();
        std::fs::write(upper.path().join("src/deep/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(upper.path().join("a b.txt"), "spaces\n").unwrap();
        let long = "n".repeat(150);
        std::fs::write(upper.path().join(&long), "long name\n").unwrap();
        std::os::unix::fs::symlink("../escape", upper.path().join("src/link")).unwrap();

        let first = snapshots
            .snapshot(upper.path(), meta("00000000000000aa"))
            .unwrap();
        let mut other = meta("00000000000000aa");
        other.reason = "timeout".to_owned();
        other.session_id = "session-2".to_owned();
        let second = snapshots.snapshot(upper.path(), other).unwrap();
        assert_eq!(
            second, first,
            "identical content is the first snapshot, record and all"
        );
        let on_other_image = snapshots
            .snapshot(upper.path(), meta("00000000000000bb"))
            .unwrap();
        assert_ne!(on_other_image.id, first.id);
        std::fs::write(upper.path().join("a b.txt"), "changed\n").unwrap();
        let changed = snapshots
            .snapshot(upper.path(), meta("00000000000000aa"))
            .unwrap();
        assert_ne!(changed.id, first.id);

        let mut stored = names(&fixture.dir.path().join("snapshots"));
        stored.sort();
        let mut expected: Vec<String> = [&first.id, &on_other_image.id, &changed.id]
            .iter()
            .flat_map(|id| [format!("{id}.json"), format!("{id}.tar.zst")])
            .collect();
        expected.sort();
        assert_eq!(stored, expected);
        let record: SnapshotInfo = serde_json::from_slice(
            &std::fs::read(
                fixture
                    .dir
                    .path()
                    .join(format!("snapshots/{}.json", first.id)),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(record, first);
        // Read back after a restart, with the images it names pinned.
        let reopened = snapshots_of(&fixture, &fixture.images);
        assert_eq!(reopened.get(&first.id).unwrap(), first);
        assert_eq!(reopened.list().len(), 3);
        assert_eq!(
            reopened.image_ids(),
            HashSet::from(["00000000000000aa".to_owned(), "00000000000000bb".to_owned()])
        );
    }

    /// Files go to the writer thread (small) or are streamed (large); either way the restored tree
    /// has the same contents, modes and mtimes.
    #[tokio::test]
    async fn restore_writes_many_small_and_large_files_with_modes_and_mtimes() {
        let fixture = Fixture::new(ImageSettings::default());
        let image = fixture.build_ok(None).await;
        let snapshots = snapshots_of(&fixture, &fixture.images);
        let upper = tempfile::tempdir_in(fixture.dir.path()).unwrap();
        for i in 0..300 {
            let dir = upper.path().join(format!("d{}", i / 50));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("f{i}"));
            std::fs::write(&path, format!("file {i}\n")).unwrap();
            let mode = if i % 3 == 0 { 0o755 } else { 0o640 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let large: Vec<u8> = (0..3 * QUEUED_FILE_MAX_BYTES)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(upper.path().join("large.bin"), &large).unwrap();
        let mtime = |path: &Path| std::fs::symlink_metadata(path).unwrap().mtime();
        let info = snapshots.snapshot(upper.path(), meta(&image.id)).unwrap();

        let target = fixture.dir.path().join("restored");
        drop(snapshots.restore(&info.id, &target).unwrap());
        assert_eq!(view(&target), view(upper.path()));
        for relative in ["large.bin", "d0/f0", "d5/f299", "d3"] {
            assert_eq!(
                mtime(&target.join(relative)),
                mtime(&upper.path().join(relative)),
                "{relative}"
            );
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_keeps_its_image_and_restore_refuses_when_the_image_is_gone() {
        let fixture = Fixture::new(ImageSettings {
            keep_per_repo: 1,
            ..ImageSettings::default()
        });
        let snapshots = snapshots_of(&fixture, &fixture.images);
        let image = fixture.build_ok(None).await;
        let upper = tempfile::tempdir_in(fixture.dir.path()).unwrap();
        std::fs::write(upper.path().join("change.txt"), "change\n").unwrap();
        let info = snapshots.snapshot(upper.path(), meta(&image.id)).unwrap();

        // Newer images do not retire the image a snapshot names, also after a restart.
        let newer = fixture.build_ok(None).await;
        let images = fixture.reopen();
        let snapshots = snapshots_of(&fixture, &images);
        let newest = images
            .build("demo/hello", None, None)
            .await
            .unwrap()
            .finished()
            .await;
        assert_eq!(newest.status, ImageStatus::Ready);
        assert!(images.tree_path(&image).is_dir());
        let kept: Vec<String> = images
            .list("demo/hello")
            .images
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(kept, [newest.id.as_str(), &image.id]);
        assert!(images.get(&newer.id).is_none());

        let target = fixture.dir.path().join("restore-1");
        let restored = snapshots.restore(&info.id, &target).unwrap();
        assert_eq!(restored.image.info().id, image.id);
        assert_eq!(
            std::fs::read_to_string(target.join("change.txt")).unwrap(),
            "change\n"
        );
        drop(restored);

        // Refusals: not empty, unknown, unknown image, image lost (tmpfs gone after a reboot).
        assert!(matches!(
            snapshots.restore(&info.id, &target),
            Err(SnapshotError::TargetNotEmpty { .. })
        ));
        let empty = fixture.dir.path().join("restore-2");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(
            snapshots.restore(&"0".repeat(64), &empty),
            Err(SnapshotError::NotFound { .. })
        ));
        let orphan = snapshots
            .snapshot(upper.path(), meta("00000000000000cc"))
            .unwrap();
        assert!(matches!(
            snapshots.restore(&orphan.id, &empty),
            Err(SnapshotError::ImageGone { ref image_id, .. }) if image_id == "00000000000000cc"
        ));
        std::fs::remove_dir_all(images.tree_path(&image).parent().unwrap()).unwrap();
        let images = fixture.reopen();
        let snapshots = snapshots_of(&fixture, &images);
        assert!(matches!(
            snapshots.restore(&info.id, &empty),
            Err(SnapshotError::ImageGone { ref image_id, .. }) if *image_id == image.id
        ));
        assert!(names(&empty).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_archives_and_private_paths_are_refused() {
        let fixture = Fixture::new(ImageSettings::default());
        let snapshots = snapshots_of(&fixture, &fixture.images);
        let image = fixture.build_ok(None).await;
        let upper = tempfile::tempdir_in(fixture.dir.path()).unwrap();
        std::fs::create_dir(upper.path().join("dir")).unwrap();
        std::fs::write(upper.path().join("dir/file.txt"), "data ".repeat(1000)).unwrap();

        // An upper directory that holds the sandbox's HOME (and so its secrets) is never archived.
        let mut private = meta(&image.id);
        private.private_paths = vec![upper.path().join("dir")];
        assert!(matches!(
            snapshots.snapshot(upper.path(), private),
            Err(SnapshotError::PrivatePathInUpper { .. })
        ));
        let mut bad = meta(&image.id);
        bad.reason = "line\nbreak".to_owned();
        assert!(matches!(
            snapshots.snapshot(upper.path(), bad),
            Err(SnapshotError::InvalidField {
                field: "reason",
                ..
            })
        ));

        let info = snapshots.snapshot(upper.path(), meta(&image.id)).unwrap();
        let archive = fixture
            .dir
            .path()
            .join(format!("snapshots/{}.tar.zst", info.id));
        let mut bytes = std::fs::read(&archive).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&archive, &bytes).unwrap();
        let target = fixture.dir.path().join("restore");
        assert!(matches!(
            snapshots.restore(&info.id, &target),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert!(
            names(&target).is_empty(),
            "a failed restore leaves nothing behind"
        );

        assert_eq!(
            clean_relative(Path::new("a/./b")),
            Some(PathBuf::from("a/b"))
        );
        for unsafe_path in ["../x", "/etc/passwd", "a/../../x", "", "."] {
            assert_eq!(
                clean_relative(Path::new(unsafe_path)),
                None,
                "{unsafe_path}"
            );
        }
    }
}
