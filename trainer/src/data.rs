//! Token streams on disk, and the (inputs, targets) batches cut from them.
//!
//! Formats:
//! - llm.c shards: a header of 256 little-endian i32 (`[0]` magic, `[1]` version, `[2]` token
//!   count), then the tokens: magic 20240520 version 1 with u16 tokens (GPT-2/Llama 2
//!   vocabularies), magic 20240801 version 7 with u32 tokens (Llama 3).
//! - llama2.c's pretokenized `.bin`: headerless little-endian u16 tokens.
//! - UTF-8 text with a tokenizer: documents are separated by blank lines (or by a marker line,
//!   [`DocSeparator`]), and each is encoded with the tokenizer's special tokens (`<s>` first,
//!   for Llama's), then all are concatenated; the tokens are cached beside the text.
//!
//! Token files are memory-mapped, not read: host memory does not grow with the corpus. Several
//! files are one stream, their concatenation in the order given.
//!
//! Batch `k` of `B × T` uses tokens `[k·B·T, k·B·T + B·T + 1)`: inputs are the first `B·T`,
//! targets the last `B·T` (the same stream shifted by one), both read as `B` rows of `T`.

use crate::tokenizer::TextTokenizer;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Where the tokens of one file live.
enum Tokens {
    /// Decoded into memory (text encoded without a cache, the built-in corpus, tests).
    Memory(Vec<u32>),
    /// A memory-mapped token file: `count` little-endian tokens of `width` bytes from byte
    /// `offset`. Only the pages a batch touches are read, so host memory does not grow with the
    /// file; they are page cache, which the kernel reclaims.
    Mapped { map: Mmap, offset: usize, width: usize, count: usize },
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Self::Memory(tokens) => tokens.len(),
            Self::Mapped { count, .. } => *count,
        }
    }

    /// Appends tokens `[start, start + n)` (within bounds) to `out`.
    fn extend_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        match self {
            Self::Memory(tokens) => out.extend_from_slice(&tokens[start..start + n]),
            Self::Mapped { map, offset, width: 2, .. } => {
                let bytes = &map[offset + 2 * start..offset + 2 * (start + n)];
                out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32));
            }
            Self::Mapped { map, offset, .. } => {
                let bytes = &map[offset + 4 * start..offset + 4 * (start + n)];
                out.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }
    }
}

/// One file of a stream and where its tokens start in the concatenation.
struct Shard {
    path: PathBuf,
    first: usize,
    tokens: Tokens,
}

/// A token stream: one file or the concatenation of several (in the order given), or a view of
/// a part of one. Token files are memory-mapped, so opening a file of any size costs no host
/// memory; cloning and [`Self::slice`] share the files.
#[derive(Clone)]
pub struct TokenStream {
    /// The file, or the first file of several (errors about positions name the file itself).
    pub path: PathBuf,
    pub format: DetectedFormat,
    shards: Arc<[Shard]>,
    /// This view: tokens `[start, start + len)` of the concatenation.
    start: usize,
    len: usize,
}

fn format_error(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_path_buf(), message: message.into() }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// How a token file's bytes hold its tokens.
struct Layout {
    format: DetectedFormat,
    offset: usize,
    width: usize,
    count: usize,
}

impl TokenStream {
    /// A stream of tokens already in memory, named `path` in messages.
    pub fn from_tokens(path: impl Into<PathBuf>, format: DetectedFormat, tokens: Vec<u32>) -> Self {
        let path = path.into();
        let len = tokens.len();
        let shard = Shard { path: path.clone(), first: 0, tokens: Tokens::Memory(tokens) };
        Self { path, format, shards: Arc::from(vec![shard]), start: 0, len }
    }

    /// Opens the token file `path`, memory-mapped (its header is checked now, its tokens read
    /// when a batch needs them).
    pub fn open(path: &Path, format: TokenFormat) -> Result<Self> {
        Self::open_many(std::slice::from_ref(&path.to_path_buf()), format)
    }

    /// The concatenation of the token files `paths`, in that order. They must be of one format.
    pub fn open_many(paths: &[PathBuf], format: TokenFormat) -> Result<Self> {
        let Some(first_path) = paths.first() else {
            return Err(format_error(Path::new("--data"), "no files given"));
        };
        let mut shards = Vec::with_capacity(paths.len());
        let mut detected: Option<(DetectedFormat, &Path)> = None;
        let mut total = 0;
        for path in paths {
            let (layout, tokens) = map_tokens(path, format)?;
            match detected {
                Some((seen, seen_path)) if seen != layout.format => {
                    return Err(format_error(
                        path,
                        format!(
                            "is a {}, but {} is a {seen}: one stream needs one format",
                            layout.format,
                            seen_path.display()
                        ),
                    ));
                }
                None => detected = Some((layout.format, path)),
                _ => {}
            }
            let len = tokens.len();
            shards.push(Shard { path: path.clone(), first: total, tokens });
            total += len;
        }
        let format = detected.map(|(f, _)| f).unwrap_or(DetectedFormat::Llama2c);
        Ok(Self { path: first_path.clone(), format, shards: Arc::from(shards), start: 0, len: total })
    }

    /// Reads the UTF-8 text `path` and encodes it with `tokenizer` (see the module's rule), in
    /// memory; [`Self::open_text_files`] caches the tokens beside the text.
    pub fn open_text(path: &Path, tokenizer: &TextTokenizer) -> crate::Result<Self> {
        let text = read_text(path)?;
        let encoded = tokenizer.encode_all(documents(&text), true)?;
        Ok(Self::from_tokens(path, DetectedFormat::Text, encoded.concat()))
    }

    /// The text files `paths`, each split into documents by `separator` and encoded with
    /// `tokenizer`, concatenated in order. Each file's tokens are cached beside it as
    /// `FILE.tokens-KEY.bin` (an llm.c uint32 shard; KEY hashes the text, the tokenizer and the
    /// separator), so a second run maps the cache instead of encoding again; where the cache
    /// cannot be written the tokens stay in memory. Returns what happened to each cache.
    pub fn open_text_files(
        paths: &[PathBuf],
        tokenizer: &TextTokenizer,
        separator: &DocSeparator,
    ) -> crate::Result<(Self, Vec<CacheOutcome>)> {
        let Some(first_path) = paths.first() else {
            return Err(format_error(Path::new("--data"), "no files given").into());
        };
        let tokenizer_json = tokenizer.to_json()?;
        let mut shards = Vec::with_capacity(paths.len());
        let mut outcomes = Vec::with_capacity(paths.len());
        let mut total = 0;
        for path in paths {
            let (tokens, outcome) = cached_text_tokens(path, tokenizer, &tokenizer_json, separator)?;
            let len = tokens.len();
            shards.push(Shard { path: path.clone(), first: total, tokens });
            outcomes.push(outcome);
            total += len;
        }
        let stream = Self {
            path: first_path.clone(),
            format: DetectedFormat::Text,
            shards: Arc::from(shards),
            start: 0,
            len: total,
        };
        Ok((stream, outcomes))
    }

    /// Decodes the bytes of a token file (`path` names it in errors) into memory.
    pub fn decode(path: &Path, bytes: &[u8], format: TokenFormat) -> Result<Self> {
        let layout = layout(path, bytes, format)?;
        let mut tokens = Vec::with_capacity(layout.count);
        let body = &bytes[layout.offset..layout.offset + layout.count * layout.width];
        if layout.width == 2 {
            tokens.extend(body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32));
        } else {
            tokens.extend(body.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Ok(Self::from_tokens(path, layout.format, tokens))
    }

    /// Tokens in the stream.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The files the stream reads, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Whether every token is held in host memory (nothing is mapped from a file).
    pub fn in_memory(&self) -> bool {
        self.shards.iter().all(|s| matches!(s.tokens, Tokens::Memory(_)))
    }

    /// Tokens `[start, start + n)` of the stream, read across files; `None` past its end.
    pub fn read(&self, start: usize, n: usize) -> Option<Vec<u32>> {
        if start.checked_add(n)? > self.len {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        let (mut at, end) = (self.start + start, self.start + start + n);
        let mut index = self.shards.partition_point(|s| s.first + s.tokens.len() <= at);
        while at < end {
            let shard = &self.shards[index];
            let local = at - shard.first;
            let take = (shard.tokens.len() - local).min(end - at);
            shard.tokens.extend_into(local, take, &mut out);
            at += take;
            index += 1;
        }
        Some(out)
    }

    /// Every token, in memory (for tests and small streams).
    pub fn to_vec(&self) -> Vec<u32> {
        self.read(0, self.len).expect("the whole stream is in range")
    }

    /// Tokens `[start, start + len)` of this stream as a stream sharing its files.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.len, "slice [{start}, {}) of a stream of {}", start + len, self.len);
        Self { start: self.start + start, len, ..self.clone() }
    }

    /// The file holding position `position` of this stream and the position within that file.
    fn locate(&self, position: usize) -> (&Path, usize) {
        let at = self.start + position;
        let index =
            self.shards.partition_point(|s| s.first + s.tokens.len() <= at).min(self.shards.len() - 1);
        let shard = &self.shards[index];
        (&shard.path, at - shard.first)
    }

    /// The first id in the stream that reaches past `vocab_size`, as an error naming its file
    /// and position there. Reads the whole stream.
    pub fn check_vocabulary(&self, vocab_size: usize) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut start = 0;
        while start < self.len {
            let n = CHUNK.min(self.len - start);
            let tokens = self.read(start, n).expect("in range");
            if let Some(offset) = tokens.iter().position(|&id| id as usize >= vocab_size) {
                return Err(self.out_of_vocabulary(start + offset, tokens[offset], vocab_size));
            }
            start += n;
        }
        Ok(())
    }

    fn out_of_vocabulary(&self, position: usize, id: u32, vocab_size: usize) -> DataError {
        let (path, position) = self.locate(position);
        DataError::OutOfVocabulary { path: path.to_path_buf(), position, id, vocab_size }
    }

    /// Whole `batch × seq` batches in the stream (each needs one token more than it holds).
    pub fn batches(&self, batch: usize, seq: usize) -> usize {
        self.len.saturating_sub(1) / (batch * seq).max(1)
    }

    /// Checks the stream holds at least one batch and that `wanted` (default: all) fit.
    pub fn plan(&self, batch: usize, seq: usize, wanted: Option<usize>) -> Result<usize> {
        let available = self.batches(batch, seq);
        if available == 0 {
            return Err(DataError::TooShort {
                path: self.path.clone(),
                tokens: self.len,
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
        let window = self.read(start, n + 1).ok_or_else(|| DataError::TooFewBatches {
            path: self.path.clone(),
            asked: k + 1,
            available: self.batches(batch, seq),
            batch,
            seq,
        })?;
        if let Some(offset) = window.iter().position(|&id| id as usize >= vocab_size) {
            return Err(self.out_of_vocabulary(start + offset, window[offset], vocab_size));
        }
        let targets = window[1..].iter().map(|&t| t as i32).collect();
        let mut inputs = window;
        inputs.truncate(n);
        Ok((inputs, targets))
    }
}

/// Maps the token file `path` and checks its header.
fn map_tokens(path: &Path, format: TokenFormat) -> Result<(Layout, Tokens)> {
    if format == TokenFormat::Text {
        return Err(format_error(path, "text needs a tokenizer: read it with TokenStream::open_text_files"));
    }
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    if size == 0 {
        let layout = layout(path, &[], format)?;
        return Ok((layout, Tokens::Memory(Vec::new())));
    }
    // SAFETY: the map is only read. The file must not be truncated while training reads it
    // (as for every trainer that maps its shards); that is the user's contract, said in --help.
    let map = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
    let layout = layout(path, &map, format)?;
    let (offset, width, count) = (layout.offset, layout.width, layout.count);
    Ok((layout, Tokens::Mapped { map, offset, width, count }))
}

/// Where the tokens of a token file are, from its first bytes and size.
fn layout(path: &Path, bytes: &[u8], format: TokenFormat) -> Result<Layout> {
    let header_word = |i: usize| -> Option<i32> {
        bytes.get(4 * i..4 * i + 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = header_word(0);
    let is_llmc_magic = matches!(magic, Some(LLMC_MAGIC_U16 | LLMC_MAGIC_U32));
    let llmc = match format {
        TokenFormat::Llmc => true,
        TokenFormat::Llama2c => false,
        TokenFormat::Text => {
            return Err(format_error(path, "text needs a tokenizer: read it with TokenStream::open_text"));
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
        return Ok(Layout { format: DetectedFormat::Llama2c, offset: 0, width: 2, count: bytes.len() / 2 });
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
                format!("wrong magic {m} for an llm.c shard: expected {LLMC_MAGIC_U16} or {LLMC_MAGIC_U32}"),
            ));
        }
    };
    let count =
        usize::try_from(count).map_err(|_| format_error(path, format!("negative token count {count}")))?;
    let body = bytes.len() - LLMC_HEADER_BYTES;
    if body != count * width {
        return Err(format_error(
            path,
            format!(
                "header says {count} tokens ({} bytes) but {body} bytes follow the header",
                count * width
            ),
        ));
    }
    Ok(Layout { format, offset: LLMC_HEADER_BYTES, width, count })
}

/// How a text file is cut into documents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocSeparator {
    /// Blank lines (lines of only whitespace) end documents.
    #[default]
    BlankLine,
    /// A line equal to this marker (after trimming whitespace) ends a document: `%` for fortune
    /// files. Blank lines are then part of documents.
    Line(String),
}

impl DocSeparator {
    /// `--doc-separator`: none means blank lines.
    pub fn from_option(line: Option<&str>) -> Self {
        match line {
            Some(line) => Self::Line(line.trim().to_string()),
            None => Self::BlankLine,
        }
    }

    fn ends_document(&self, line: &str) -> bool {
        match self {
            Self::BlankLine => line.trim().is_empty(),
            Self::Line(marker) => line.trim() == marker,
        }
    }
}

impl fmt::Display for DocSeparator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlankLine => f.write_str("blank lines"),
            Self::Line(marker) => write!(f, "lines reading {marker:?}"),
        }
    }
}

/// What became of a text file's token cache.
#[derive(Clone, Debug)]
pub enum CacheOutcome {
    /// The cache was there and was mapped: no encoding.
    Hit { cache: PathBuf },
    /// The text was encoded and the cache written.
    Written { cache: PathBuf },
    /// The text was encoded; the cache could not be written (the tokens stay in memory).
    Unwritable { cache: PathBuf, reason: String },
}

impl fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hit { cache } => write!(f, "tokens read from the cache {}", cache.display()),
            Self::Written { cache } => write!(f, "encoded; tokens cached in {}", cache.display()),
            Self::Unwritable { cache, reason } => {
                write!(
                    f,
                    "encoded; could not write the cache {} ({reason}): tokens kept in memory",
                    cache.display()
                )
            }
        }
    }
}

/// Documents encoded per call of the tokenizer's parallel batch encoder: bounds the memory of
/// encoding a large text while keeping all cores busy.
const ENCODE_CHUNK_DOCUMENTS: usize = 4096;

/// The tokens of the text file `path`, from its cache beside it when the key matches, else
/// encoded (and cached when possible).
fn cached_text_tokens(
    path: &Path,
    tokenizer: &TextTokenizer,
    tokenizer_json: &str,
    separator: &DocSeparator,
) -> crate::Result<(Tokens, CacheOutcome)> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    let map = if size == 0 {
        None
    } else {
        // SAFETY: read only; see `map_tokens`.
        Some(unsafe { Mmap::map(&file) }.map_err(io_error(path))?)
    };
    let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
    let mut key = xxhash_rust::xxh3::Xxh3::new();
    key.update(&xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes());
    key.update(tokenizer_json.as_bytes());
    key.update(format!("{separator:?}").as_bytes());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let cache = path.with_file_name(format!("{name}.tokens-{:032x}.bin", key.digest128()));
    if let Ok((layout, tokens)) = map_tokens(&cache, TokenFormat::Llmc)
        && layout.format == DetectedFormat::LlmcU32
    {
        return Ok((tokens, CacheOutcome::Hit { cache }));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| not_utf8(path, &e))?;
    let staged = cache.with_file_name(format!("{name}.tokens-{}.tmp", std::process::id()));
    // Streamed to a staging name, then renamed: a cache is either complete or absent, and the
    // tokens never sit in memory whole.
    let streamed = (|| -> std::io::Result<std::result::Result<(), crate::TrainError>> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&staged)?);
        out.write_all(&encode_llmc_u32(&[]))?;
        let mut count = 0usize;
        let mut written =
            |tokens: &[u32], out: &mut std::io::BufWriter<std::fs::File>| -> std::io::Result<()> {
                count += tokens.len();
                out.write_all(&tokens.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>())
            };
        let failed = encode_in_chunks(text, separator, tokenizer, |tokens| written(tokens, &mut out));
        match failed {
            Err(EncodeFailure::Io(e)) => return Err(e),
            Err(EncodeFailure::Other(e)) => return Ok(Err(e)),
            Ok(()) => {}
        }
        let Ok(count) = i32::try_from(count) else {
            return Ok(Err(format_error(
                path,
                format!("encodes to {count} tokens, more than an llm.c shard holds (2^31 - 1): split the text into several files"),
            )
            .into()));
        };
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.seek(std::io::SeekFrom::Start(8))?;
        file.write_all(&count.to_le_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staged, &cache)?;
        Ok(Ok(()))
    })();
    match streamed {
        Ok(Ok(())) => {
            let (_, mapped) = map_tokens(&cache, TokenFormat::Llmc)?;
            Ok((mapped, CacheOutcome::Written { cache }))
        }
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&staged);
            Err(e)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            let mut tokens = Vec::new();
            encode_in_chunks(text, separator, tokenizer, |chunk| {
                tokens.extend_from_slice(chunk);
                Ok(())
            })
            .map_err(|failure| match failure {
                EncodeFailure::Other(e) => e,
                EncodeFailure::Io(e) => DataError::Io { path: path.to_path_buf(), source: e }.into(),
            })?;
            Ok((Tokens::Memory(tokens), CacheOutcome::Unwritable { cache, reason: e.to_string() }))
        }
    }
}

enum EncodeFailure {
    Io(std::io::Error),
    Other(crate::TrainError),
}

/// Encodes the documents of `text` a chunk at a time (the tokenizer's parallel batch encoder on
/// each), handing each chunk's tokens to `sink`.
fn encode_in_chunks(
    text: &str,
    separator: &DocSeparator,
    tokenizer: &TextTokenizer,
    mut sink: impl FnMut(&[u32]) -> std::io::Result<()>,
) -> std::result::Result<(), EncodeFailure> {
    let mut docs = documents_by(text, separator).peekable();
    while docs.peek().is_some() {
        let chunk: Vec<&str> = docs.by_ref().take(ENCODE_CHUNK_DOCUMENTS).collect();
        let encoded = tokenizer.encode_all(chunk, true).map_err(|e| EncodeFailure::Other(e.into()))?;
        sink(&encoded.concat()).map_err(EncodeFailure::Io)?;
    }
    Ok(())
}

fn not_utf8(path: &Path, e: &std::str::Utf8Error) -> DataError {
    format_error(path, format!("is not UTF-8 text (invalid byte at offset {})", e.valid_up_to()))
}

/// The contents of a text file, or an error naming the first byte that is not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    String::from_utf8(bytes).map_err(|e| not_utf8(path, &e.utf8_error()))
}

/// The documents of a text: the non-blank stretches between blank lines, trimmed.
pub fn documents(text: &str) -> Vec<&str> {
    documents_by(text, &DocSeparator::BlankLine).collect()
}

/// The documents of a text cut by `separator`: the stretches between separator lines, trimmed,
/// empty ones skipped.
pub fn documents_by<'a>(text: &'a str, separator: &'a DocSeparator) -> impl Iterator<Item = &'a str> + 'a {
    let mut lines = text.split_inclusive('\n');
    let mut offset = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut start: Option<usize> = None;
        let mut end = 0;
        loop {
            let Some(line) = lines.next() else {
                done = true;
                return start.map(|s| text[s..end].trim()).filter(|d| !d.is_empty());
            };
            let line_start = offset;
            offset += line.len();
            if separator.ends_document(line) {
                if let Some(s) = start {
                    let doc = text[s..end].trim();
                    if !doc.is_empty() {
                        return Some(doc);
                    }
                    start = None;
                }
            } else {
                start.get_or_insert(line_start);
                end = offset;
            }
        }
    })
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
