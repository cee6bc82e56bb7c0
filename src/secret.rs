//! Secrets held as file paths and re-read when the file changes.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, so the file's metadata (followed
//! through the link) changes; a changed modification time or length triggers a re-read. The
//! value is a [`SecretString`] from the moment it is read, and is never logged.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use secrecy::SecretString;

/// Why a secret file could not be used. Names the path, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {kind}")]
    Read {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("secret file {0} is empty")]
    Empty(PathBuf),
}

/// A secret read from a file, cached until the file changes.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
    cached: Mutex<Option<(Stamp, SecretString)>>,
}

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl SecretFile {
    /// A secret at `path`; nothing is read yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// The file's path (safe to log).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current value: from the cache while the file is unchanged, else read again.
    /// Surrounding whitespace (a trailing newline from `echo`) is trimmed.
    pub async fn get(&self) -> Result<SecretString, SecretError> {
        let read_err = |e: std::io::Error| SecretError::Read {
            path: self.path.clone(),
            kind: e.kind(),
        };
        // A stat of a local file: cheaper inline than a trip through the blocking pool.
        let meta = std::fs::metadata(&self.path).map_err(read_err)?;
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        };
        if let Some((s, value)) = self.lock().as_ref()
            && *s == stamp
        {
            return Ok(value.clone());
        }
        let value = read_trimmed(&self.path).await?;
        *self.lock() = Some((stamp, value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Stamp, SecretString)>> {
        // A poisoned lock only means a panic elsewhere; the cached value is still consistent.
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads a file afresh (for assertions that rotate, such as projected service-account tokens).
pub async fn read_trimmed(path: &Path) -> Result<SecretString, SecretError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| SecretError::Read {
            path: path.to_path_buf(),
            kind: e.kind(),
        })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::Empty(path.to_path_buf()));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[tokio::test]
    async fn value_is_re_read_when_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").expect("write");
        let secret = SecretFile::new(&path);
        assert_eq!(secret.get().await.expect("read").expose_secret(), "first");
        std::fs::write(&path, "second-longer\n").expect("write");
        assert_eq!(
            secret.get().await.expect("read").expose_secret(),
            "second-longer"
        );
    }

    #[tokio::test]
    async fn errors_name_the_path_not_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty");
        std::fs::write(&path, "  \n").expect("write");
        let err = SecretFile::new(&path).get().await.expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = SecretFile::new(dir.path().join("missing"))
            .get()
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
