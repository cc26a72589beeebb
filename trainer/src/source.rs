//! Where a run's data comes from, recorded in every checkpoint so that `--resume` reads the same
//! data or refuses.
//!
//! `--data` takes files and glob patterns; the stream is the concatenation of every file they
//! name, in sorted (byte-wise) path order, each file once. Each file is recorded with its size
//! and its xxh3-128 content hash; a resumed run re-hashes the files and refuses one that
//! changed, naming it and both fingerprints.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--data {pattern}: not a valid glob pattern: {message}")]
    Pattern { pattern: String, message: String },
    #[error("--data {pattern}: no file matches")]
    NoMatch { pattern: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// One data file as it was when the run read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Absolute path.
    pub path: PathBuf,
    pub bytes: u64,
    /// xxh3-128 of the whole file, 32 hex digits.
    pub xxh3_128: String,
}

impl FileRecord {
    /// Whether both name the same contents (the path may differ: a moved corpus is the same data).
    pub fn same_contents(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.xxh3_128 == other.xxh3_128
    }
}

impl std::fmt::Display for FileRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes, xxh3-128 {})", self.path.display(), self.bytes, self.xxh3_128)
    }
}

/// What a run trains (or validates) on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// The built-in corpus: `bytes` of generated text from `seed`, byte tokens.
    Builtin { bytes: usize, seed: u64 },
    /// Files read as `format` (`auto`, `llmc`, `llama2c`, `text` or `jsonl`), in this order;
    /// text split into documents at `doc_separator` lines (blank lines when `None`).
    Files {
        format: String,
        #[serde(default)]
        doc_separator: Option<String>,
        files: Vec<FileRecord>,
    },
}

impl DataSource {
    /// The files' paths, in stream order (none for the built-in corpus).
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Builtin { .. } => Vec::new(),
            Self::Files { files, .. } => files.iter().map(|f| f.path.clone()).collect(),
        }
    }

    /// One line for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Builtin { bytes, seed } => format!("the built-in corpus ({bytes} bytes, seed {seed})"),
            Self::Files { format, files, .. } => {
                let bytes: u64 = files.iter().map(|f| f.bytes).sum();
                match files.as_slice() {
                    [one] => format!("{} ({format}, {bytes} bytes)", one.path.display()),
                    many => format!(
                        "{} files from {} to {} ({format}, {bytes} bytes)",
                        many.len(),
                        many.first().map(|f| f.path.display().to_string()).unwrap_or_default(),
                        many.last().map(|f| f.path.display().to_string()).unwrap_or_default(),
                    ),
                }
            }
        }
    }

    /// Why `now` is not the data this record names, or `None` when it is: the same files'
    /// contents in the same order, read the same way. Paths may differ.
    pub fn difference(&self, now: &DataSource) -> Option<String> {
        match (self, now) {
            (a @ Self::Builtin { .. }, b @ Self::Builtin { .. }) if a == b => None,
            (
                Self::Files { format: f0, doc_separator: s0, files: a },
                Self::Files { format: f1, doc_separator: s1, files: b },
            ) => {
                if f0 != f1 {
                    return Some(format!("the run read its data as {f0}, now as {f1}"));
                }
                if s0 != s1 {
                    return Some(format!(
                        "the run split documents at {}, now at {}",
                        separator_name(s0.as_deref()),
                        separator_name(s1.as_deref())
                    ));
                }
                if a.len() != b.len() {
                    return Some(format!("the run read {} file(s), now {}", a.len(), b.len()));
                }
                a.iter().zip(b).find(|(x, y)| !x.same_contents(y)).map(|(x, y)| {
                    if x.path == y.path {
                        format!("{} changed since the run read it: was {x}, now {y}", x.path.display())
                    } else {
                        format!("the run read {x}; now {y}")
                    }
                })
            }
            (a, b) => Some(format!("the run trained on {}; now {}", a.describe(), b.describe())),
        }
    }
}

fn separator_name(separator: Option<&str>) -> String {
    match separator {
        Some(line) => format!("lines reading {line:?}"),
        None => "blank lines".into(),
    }
}

/// Validation data of a run, recorded so a resumed run holds out the same tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeldOut {
    /// Nothing: the run does not evaluate, and trains on every token.
    None,
    /// The last `fraction` of the training data (at least one batch; pretraining), or of the
    /// examples (SFT).
    Fraction { fraction: f64 },
    /// Separate files (`--val-data`).
    Files { source: DataSource },
}

/// The files `patterns` name, sorted by path and each once: a pattern with `*`, `?` or `[` is
/// a glob (it must match at least one file), any other is a path (that must exist).
pub fn expand(patterns: &[PathBuf]) -> Result<Vec<PathBuf>, SourceError> {
    let mut paths = Vec::new();
    for pattern in patterns {
        let text = pattern.to_string_lossy();
        if !text.contains(['*', '?', '[']) {
            std::fs::metadata(pattern).map_err(|source| SourceError::Io { path: pattern.clone(), source })?;
            paths.push(pattern.clone());
            continue;
        }
        let matches = glob::glob(&text)
            .map_err(|e| SourceError::Pattern { pattern: text.to_string(), message: e.to_string() })?;
        let before = paths.len();
        for entry in matches {
            let path = entry.map_err(|e| SourceError::Io {
                path: e.path().to_path_buf(),
                source: std::io::Error::other(e.error().to_string()),
            })?;
            if path.is_file() {
                paths.push(path);
            }
        }
        if paths.len() == before {
            return Err(SourceError::NoMatch { pattern: text.to_string() });
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Size and xxh3-128 of each file (read once, in 1 MiB pieces: host memory stays flat).
pub fn fingerprint(paths: &[PathBuf]) -> Result<Vec<FileRecord>, SourceError> {
    paths.iter().map(|path| fingerprint_file(path)).collect()
}

fn fingerprint_file(path: &Path) -> Result<FileRecord, SourceError> {
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    let absolute = std::path::absolute(path).map_err(io)?;
    Ok(FileRecord { path: absolute, bytes, xxh3_128: format!("{:032x}", hasher.digest128()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cubellama-source-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn globs_expand_sorted_once_and_empty_ones_are_named() {
        let dir = scratch("glob");
        for name in ["shard_002.bin", "shard_000.bin", "shard_001.bin", "notes.txt"] {
            std::fs::write(dir.join(name), name).unwrap();
        }
        let pattern = dir.join("shard_*.bin");
        let again = dir.join("shard_001.bin");
        let paths = expand(&[pattern, again]).unwrap();
        let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["shard_000.bin", "shard_001.bin", "shard_002.bin"]);
        let err = expand(&[dir.join("val_*.bin")]).unwrap_err().to_string();
        assert!(err.contains("val_*.bin") && err.contains("no file matches"), "{err}");
        let err = expand(&[dir.join("missing.bin")]).unwrap_err().to_string();
        assert!(err.contains("missing.bin"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_changed_file_is_named_with_both_fingerprints() {
        let dir = scratch("changed");
        let file = dir.join("data.bin");
        std::fs::write(&file, [1u8, 2, 3, 4]).unwrap();
        let record = |files| DataSource::Files { format: "auto".into(), doc_separator: None, files };
        let before = record(fingerprint(std::slice::from_ref(&file)).unwrap());
        assert_eq!(before.difference(&record(fingerprint(std::slice::from_ref(&file)).unwrap())), None);
        // The file read in pieces hashes as its bytes hashed at once.
        let DataSource::Files { files, .. } = &before else { unreachable!() };
        assert_eq!(files[0].xxh3_128, format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&[1, 2, 3, 4])));
        std::fs::write(&file, [1u8, 2, 3, 5]).unwrap();
        let after = record(fingerprint(std::slice::from_ref(&file)).unwrap());
        let why = before.difference(&after).expect("a changed file differs");
        assert!(
            why.contains("data.bin changed since the run read it") && why.matches("xxh3-128").count() == 2,
            "{why}"
        );
        // A moved copy of the same bytes is the same data.
        let moved = dir.join("moved.bin");
        std::fs::write(&moved, [1u8, 2, 3, 5]).unwrap();
        assert_eq!(after.difference(&record(fingerprint(&[moved]).unwrap())), None);
        let builtin = DataSource::Builtin { bytes: 400_000, seed: 0 };
        assert!(builtin.difference(&after).unwrap().contains("the built-in corpus"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
