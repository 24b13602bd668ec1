//! The workspace root and the confinement of every path a tool touches.
//!
//! Invariant: a path a tool gets from the model resolves to a location inside the canonical workspace
//! root and outside `.git/`. Absolute paths and `..` that leave the root are refused before any file
//! system access; the nearest existing ancestor is canonicalized, so a symlink (file or directory,
//! dangling or not) that leads outside is refused for reads and writes alike. (A bash command is not a
//! path: it runs under the sandbox policy of `tools::bash`.)

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use super::tools::ToolError;

/// The directory the tools are confined to.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

/// A path inside the workspace, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPath {
    /// Absolute path to use for file system calls.
    pub absolute: PathBuf,
    /// Path relative to the root, `/`-separated (empty for the root itself).
    pub relative: String,
}

impl Workspace {
    /// Open the workspace at `root`, which must exist.
    pub fn open(root: &Path) -> Result<Self, ToolError> {
        let root = std::fs::canonicalize(root).map_err(|source| ToolError::Io {
            path: root.display().to_string(),
            source,
        })?;
        Ok(Self { root })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Check `path` (relative to the root) and find where it really is.
    pub fn resolve(&self, path: &str) -> Result<ResolvedPath, ToolError> {
        let escape = || ToolError::PathEscape {
            path: path.to_owned(),
        };
        let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
        for component in Path::new(path).components() {
            match component {
                Component::Normal(part) => parts.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    parts.pop().ok_or_else(escape)?;
                }
                Component::RootDir | Component::Prefix(_) => return Err(escape()),
            }
        }
        let lexical: PathBuf = parts.iter().collect();
        let joined = self.root.join(&lexical);

        // Walk up to the nearest entry that exists (a dangling symlink exists too).
        let mut existing = joined.as_path();
        let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
        loop {
            match std::fs::symlink_metadata(existing) {
                Ok(_) => break,
                Err(error) if error.kind() == ErrorKind::NotFound => {
                    let (Some(parent), Some(name)) = (existing.parent(), existing.file_name())
                    else {
                        return Err(escape());
                    };
                    missing.push(name);
                    existing = parent;
                }
                Err(source) => {
                    return Err(ToolError::Io {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        // A dangling symlink cannot be canonicalized: writing through it could land anywhere.
        let canonical = std::fs::canonicalize(existing).map_err(|_| escape())?;
        let inside = canonical.strip_prefix(&self.root).map_err(|_| escape())?;
        let mut relative: PathBuf = inside.to_path_buf();
        relative.extend(missing.iter().rev());
        if relative.components().any(|c| c.as_os_str() == ".git") {
            return Err(ToolError::GitDir {
                path: path.to_owned(),
            });
        }
        let relative_text = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        Ok(ResolvedPath {
            absolute: self.root.join(&relative),
            relative: relative_text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        outside: PathBuf,
        workspace: Workspace,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "secret").unwrap();
        std::fs::write(root.join("src/lib.rs"), "fn main() {}\n").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("out-file")).unwrap();
        std::os::unix::fs::symlink(outside.join("nothing-yet"), root.join("dangling")).unwrap();
        std::os::unix::fs::symlink(root.join("src"), root.join("in-dir")).unwrap();
        std::os::unix::fs::symlink(root.join(".git"), root.join("git-link")).unwrap();
        let workspace = Workspace::open(&root).unwrap();
        Fixture {
            _dir: dir,
            outside,
            workspace,
        }
    }

    fn check(workspace: &Workspace, path: &str, expected: Result<&str, &str>) {
        let got = workspace.resolve(path);
        match (&got, expected) {
            (Ok(resolved), Ok(relative)) => {
                assert_eq!(resolved.relative, relative, "{path}");
                assert_eq!(resolved.absolute, workspace.root().join(relative), "{path}");
            }
            (Err(error), Err(kind)) => {
                let got_kind = match error {
                    ToolError::PathEscape { .. } => "escape",
                    ToolError::GitDir { .. } => "git",
                    _ => "other",
                };
                assert_eq!(got_kind, kind, "{path}: {error}");
            }
            _ => panic!("{path}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn paths_inside_resolve() {
        let f = fixture();
        check(&f.workspace, "", Ok(""));
        check(&f.workspace, ".", Ok(""));
        check(&f.workspace, "src/lib.rs", Ok("src/lib.rs"));
        check(&f.workspace, "./src/../src/lib.rs", Ok("src/lib.rs"));
        check(&f.workspace, "new/dir/file.txt", Ok("new/dir/file.txt"));
        check(&f.workspace, "in-dir/lib.rs", Ok("src/lib.rs"));
        check(&f.workspace, "in-dir/new.rs", Ok("src/new.rs"));
    }

    #[test]
    fn escapes_are_refused() {
        let f = fixture();
        check(&f.workspace, "../x", Err("escape"));
        check(&f.workspace, "src/../../x", Err("escape"));
        check(&f.workspace, "/etc/passwd", Err("escape"));
        let absolute_inside = f.workspace.root().join("src/lib.rs");
        check(
            &f.workspace,
            &absolute_inside.display().to_string(),
            Err("escape"),
        );
        check(
            &f.workspace,
            &f.outside.join("secret.txt").display().to_string(),
            Err("escape"),
        );
        check(&f.workspace, "out-dir/secret.txt", Err("escape"));
        check(&f.workspace, "out-dir/new-file.txt", Err("escape"));
        check(&f.workspace, "out-dir/new/deep/file.txt", Err("escape"));
        check(&f.workspace, "out-file", Err("escape"));
        check(&f.workspace, "dangling", Err("escape"));
        check(&f.workspace, "dangling/below", Err("escape"));
    }

    #[test]
    fn git_dir_is_refused() {
        let f = fixture();
        check(&f.workspace, ".git/config", Err("git"));
        check(&f.workspace, ".git", Err("git"));
        check(&f.workspace, "src/.git/x", Err("git"));
        check(&f.workspace, "git-link/config", Err("git"));
    }
}
