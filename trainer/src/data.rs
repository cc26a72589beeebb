//! Token streams on disk, and the (inputs, targets) batches cut from them.
//!
//! Formats:
//! - llm.c shards: a header of 256 little-endian i32 (`[0]` magic, `[1]` version, `[2]` token
//!   count), then the tokens: magic 20240520 version 1 with u16 tokens (GPT-2/Llama 2
//!   vocabularies), magic 20240801 version 7 with u32 tokens (Llama 3).
//! - llama2.c's pretokenized `.bin`: headerless little-endian u16 tokens.
//! - UTF-8 text with a tokenizer: documents are separated by blank lines, and each is encoded
//!   with the tokenizer's special tokens (`<s>` first, for Llama's), then all are concatenated.
//!
//! Batch `k` of `B × T` uses tokens `[k·B·T, k·B·T + B·T + 1)`: inputs are the first `B·T`,
//! targets the last `B·T` (the same stream shifted by one), both read as `B` rows of `T`.

use crate::tokenizer::TextTokenizer;
use std::fmt;
use std::path::{Path, PathBuf};

pub const LLMC_MAGIC_U16: i32 = 20240520;
pub const LLMC_MAGIC_U32: i32 = 20240801;
const LLMC_HEADER_BYTES: usize = 256 * 4;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("{}: token id {id} at position {position} is outside the model's vocabulary of {vocab_size}", path.display())]
    OutOfVocabulary { path: PathBuf, position: usize, id: u32, vocab_size: usize },
    #[error(
        "{}: {tokens} tokens are fewer than one batch needs ({needed} = batch {batch} × seq {seq} + 1)",
        path.display()
    )]
    TooShort { path: PathBuf, tokens: usize, needed: usize, batch: usize, seq: usize },
    #[error("{}: asked for {asked} batches of {batch} × {seq}, the file holds {available}", path.display())]
    TooFewBatches { path: PathBuf, asked: usize, available: usize, batch: usize, seq: usize },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// How a token file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// Decide from the file: an llm.c magic means llm.c, otherwise llama2.c's headerless u16.
    Auto,
    /// llm.c shard (magic required).
    Llmc,
    /// llama2.c headerless u16.
    Llama2c,
    /// UTF-8 text, read through a tokenizer.
    Text,
}

impl TokenFormat {
    /// Whether `path` is read as text: `text` asked for, or `auto` and a `.txt`, `.text` or
    /// `.md` extension.
    pub fn is_text(self, path: &Path) -> bool {
        match self {
            Self::Text => true,
            Self::Auto => path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["txt", "text", "md"].contains(&e.to_ascii_lowercase().as_str())),
            Self::Llmc | Self::Llama2c => false,
        }
    }
}

impl std::str::FromStr for TokenFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "llmc" | "llm.c" => Ok(Self::Llmc),
            "llama2c" | "llama2.c" => Ok(Self::Llama2c),
            "text" => Ok(Self::Text),
            other => Err(format!("unknown data format `{other}`: expected auto, llmc, llama2c or text")),
        }
    }
}

/// What a file turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectedFormat {
    LlmcU16,
    LlmcU32,
    Llama2c,
    Text,
}

impl fmt::Display for DetectedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LlmcU16 => "llm.c shard (v1, uint16)",
            Self::LlmcU32 => "llm.c shard (v7, uint32)",
            Self::Llama2c => "llama2.c .bin (uint16)",
            Self::Text => "UTF-8 text",
        })
    }
}

/// A whole token file in memory.
pub struct TokenStream {
    pub path: PathBuf,
    pub format: DetectedFormat,
    pub tokens: Vec<u32>,
}

fn format_error(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_path_buf(), message: message.into() }
}

impl TokenStream {
    /// Reads and decodes `path`.
    pub fn open(path: &Path, format: TokenFormat) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        Self::decode(path, &bytes, format)
    }

    /// Reads `path` as UTF-8 text and encodes it with `tokenizer` (see the module's rule).
    pub fn open_text(path: &Path, tokenizer: &TextTokenizer) -> crate::Result<Self> {
        let text = read_text(path)?;
        let encoded = tokenizer.encode_all(documents(&text), true)?;
        Ok(Self { path: path.to_path_buf(), format: DetectedFormat::Text, tokens: encoded.concat() })
    }

    /// Decodes the bytes of a token file (`path` names it in errors).
    pub fn decode(path: &Path, bytes: &[u8], format: TokenFormat) -> Result<Self> {
        let header_word = |i: usize| -> Option<i32> {
            bytes.get(4 * i..4 * i + 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let magic = header_word(0);
        let is_llmc_magic = matches!(magic, Some(LLMC_MAGIC_U16 | LLMC_MAGIC_U32));
        let llmc = match format {
            TokenFormat::Llmc => true,
            TokenFormat::Llama2c => false,
            TokenFormat::Text => {
                return Err(format_error(
                    path,
                    "text needs a tokenizer: read it with TokenStream::open_text",
                ));
            }
            TokenFormat::Auto => {
                if !is_llmc_magic && looks_like_llmc_header(bytes) {
                    return Err(format_error(
                        path,
                        format!(
                            "has an llm.c header (version {}, {} tokens, matching the file size) with magic {}; \
                             expected {LLMC_MAGIC_U16} or {LLMC_MAGIC_U32} (pass --data-format llama2c if it \
                             really is headerless)",
                            header_word(1).unwrap_or(0),
                            header_word(2).unwrap_or(0),
                            magic.unwrap_or(0),
                        ),
                    ));
                }
                is_llmc_magic
            }
        };
        if !llmc {
            if !bytes.len().is_multiple_of(2) {
                return Err(format_error(
                    path,
                    format!("{} bytes is not a whole number of uint16 tokens", bytes.len()),
                ));
            }
            let tokens = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect();
            return Ok(Self { path: path.to_path_buf(), format: DetectedFormat::Llama2c, tokens });
        }
        if bytes.len() < LLMC_HEADER_BYTES {
            return Err(format_error(
                path,
                format!("{} bytes is shorter than an llm.c header ({LLMC_HEADER_BYTES} bytes)", bytes.len()),
            ));
        }
        let (version, count) = (header_word(1).unwrap_or(0), header_word(2).unwrap_or(0));
        let (format, width) = match (magic.unwrap_or(0), version) {
            (LLMC_MAGIC_U16, 1) => (DetectedFormat::LlmcU16, 2),
            (LLMC_MAGIC_U32, 7) => (DetectedFormat::LlmcU32, 4),
            (LLMC_MAGIC_U16 | LLMC_MAGIC_U32, v) => {
                return Err(format_error(
                    path,
                    format!(
                        "llm.c magic {} with version {v}; expected version 1 (uint16) or 7 (uint32)",
                        magic.unwrap_or(0)
                    ),
                ));
            }
            (m, _) => {
                return Err(format_error(
                    path,
                    format!(
                        "wrong magic {m} for an llm.c shard: expected {LLMC_MAGIC_U16} or {LLMC_MAGIC_U32}"
                    ),
                ));
            }
        };
        let count = usize::try_from(count)
            .map_err(|_| format_error(path, format!("negative token count {count}")))?;
        let body = &bytes[LLMC_HEADER_BYTES..];
        if body.len() != count * width {
            return Err(format_error(
                path,
                format!(
                    "header says {count} tokens ({} bytes) but {} bytes follow the header",
                    count * width,
                    body.len()
                ),
            ));
        }
        let tokens = if width == 2 {
            body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect()
        } else {
            body.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        };
        Ok(Self { path: path.to_path_buf(), format, tokens })
    }

    /// Whole `batch × seq` batches in the stream (each needs one token more than it holds).
    pub fn batches(&self, batch: usize, seq: usize) -> usize {
        self.tokens.len().saturating_sub(1) / (batch * seq).max(1)
    }

    /// Checks the stream holds at least one batch and that `wanted` (default: all) fit.
    pub fn plan(&self, batch: usize, seq: usize, wanted: Option<usize>) -> Result<usize> {
        let available = self.batches(batch, seq);
        if available == 0 {
            return Err(DataError::TooShort {
                path: self.path.clone(),
                tokens: self.tokens.len(),
                needed: batch * seq + 1,
                batch,
                seq,
            });
        }
        match wanted {
            Some(asked) if asked > available => {
                Err(DataError::TooFewBatches { path: self.path.clone(), asked, available, batch, seq })
            }
            Some(asked) => Ok(asked),
            None => Ok(available),
        }
    }

    /// Inputs and targets of batch `k` (`B·T` each), every id checked against `vocab_size`.
    pub fn batch(
        &self,
        k: usize,
        batch: usize,
        seq: usize,
        vocab_size: usize,
    ) -> Result<(Vec<u32>, Vec<i32>)> {
        let n = batch * seq;
        let start = k * n;
        let window = self.tokens.get(start..start + n + 1).ok_or_else(|| DataError::TooFewBatches {
            path: self.path.clone(),
            asked: k + 1,
            available: self.batches(batch, seq),
            batch,
            seq,
        })?;
        if let Some(offset) = window.iter().position(|&id| id as usize >= vocab_size) {
            return Err(DataError::OutOfVocabulary {
                path: self.path.clone(),
                position: start + offset,
                id: window[offset],
                vocab_size,
            });
        }
        Ok((window[..n].to_vec(), window[1..].iter().map(|&t| t as i32).collect()))
    }
}

/// The contents of a text file, or an error naming the first byte that is not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes).map_err(|e| {
        format_error(
            path,
            format!("is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// The documents of a text: the non-blank stretches between blank lines, trimmed.
pub fn documents(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut end = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim().is_empty() {
            if let Some(s) = start.take() {
                out.push(text[s..end].trim());
            }
        } else {
            start.get_or_insert(offset);
            end = offset + line.len();
        }
        offset += line.len();
    }
    if let Some(s) = start {
        out.push(text[s..end].trim());
    }
    out
}

/// A header whose token count matches the file size (for 2- or 4-byte tokens) is an llm.c
/// shard whatever its magic says.
fn looks_like_llmc_header(bytes: &[u8]) -> bool {
    if bytes.len() < LLMC_HEADER_BYTES {
        return false;
    }
    let word =
        |i: usize| i32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    let (version, count) = (word(1), word(2));
    let body = bytes.len() - LLMC_HEADER_BYTES;
    count > 0
        && ((version == 1 && body == count as usize * 2) || (version == 7 && body == count as usize * 4))
}

/// Writes tokens as an llm.c v1 shard (u16 tokens) — for tests and demo data.
pub fn encode_llmc_u16(tokens: &[u16]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC_U16;
    header[1] = 1;
    header[2] = tokens.len() as i32;
    let mut bytes: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes
}

/// Writes tokens as an llm.c v7 shard (u32 tokens).
pub fn encode_llmc_u32(tokens: &[u32]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC_U32;
    header[1] = 7;
    header[2] = tokens.len() as i32;
    let mut bytes: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes
}
