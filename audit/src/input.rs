//! Reading a corpus as a stream of chunks that hold whole documents, so that chunks can be
//! audited in parallel while memory stays bounded: a few chunks in flight per thread, each
//! about [`crate::Options::chunk_bytes`] long (longer only when one document is).
//!
//! - Text (the trainer's format, [`trainer::data::documents`]): chunks end right after a blank
//!   line, so each chunk's documents are the file's.
//! - JSON Lines: chunks end after a newline; one document per line, the text in a named field.
//! - Token files (whatever [`trainer::data::TokenStream`] reads): memory-mapped and read a
//!   chunk at a time, cut into ranges that start at `<s>`; each document is decoded with the
//!   tokenizer.

use crate::error::{AuditError, Result};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use trainer::data::{TokenFormat, TokenStream};

/// How an input is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// UTF-8 text, documents separated by blank lines.
    Text,
    /// JSON Lines, one object per line with the document in a string field.
    Jsonl,
    /// A token file (llm.c shard or llama2.c `.bin`) decoded with a tokenizer.
    Tokens,
}

impl Format {
    /// The format a file's extension suggests: `.jsonl`/`.ndjson`/`.json` are JSON Lines, `.bin`
    /// a token file, anything else text.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl" | "ndjson" | "json") => Self::Jsonl,
            Some("bin") => Self::Tokens,
            _ => Self::Text,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "jsonl" => Ok(Self::Jsonl),
            "tokens" => Ok(Self::Tokens),
            other => Err(format!("unknown format `{other}`: expected text, jsonl or tokens")),
        }
    }
}

/// One file of the corpus (or bytes standing for one).
#[derive(Clone, Debug)]
pub struct Input {
    /// Names the input in errors.
    pub name: PathBuf,
    pub format: Format,
    bytes: Option<Arc<[u8]>>,
}

impl Input {
    /// A file on disk.
    pub fn file(path: impl Into<PathBuf>, format: Format) -> Self {
        Self { name: path.into(), format, bytes: None }
    }

    /// Bytes in memory, named `name` in errors.
    pub fn memory(name: impl Into<PathBuf>, bytes: impl Into<Arc<[u8]>>, format: Format) -> Self {
        Self { name: name.into(), format, bytes: Some(bytes.into()) }
    }

    /// Its size in bytes (for progress).
    pub fn len(&self) -> Result<u64> {
        match &self.bytes {
            Some(bytes) => Ok(bytes.len() as u64),
            None => std::fs::metadata(&self.name)
                .map(|m| m.len())
                .map_err(|source| AuditError::Io { path: self.name.clone(), source }),
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|n| n == 0)
    }

    fn reader(&self) -> Result<Box<dyn Read + Send>> {
        match &self.bytes {
            Some(bytes) => Ok(Box::new(std::io::Cursor::new(Arc::clone(bytes)))),
            None => std::fs::File::open(&self.name)
                .map(|f| Box::new(f) as Box<dyn Read + Send>)
                .map_err(|source| AuditError::Io { path: self.name.clone(), source }),
        }
    }

    fn tokens(&self) -> Result<TokenStream> {
        Ok(match &self.bytes {
            Some(bytes) => TokenStream::decode(&self.name, bytes, TokenFormat::Auto)?,
            None => TokenStream::open(&self.name, TokenFormat::Auto)?,
        })
    }
}

/// A piece of work for one thread.
pub(crate) struct Work {
    /// Index into the inputs.
    pub input: usize,
    /// Input bytes it covers (for progress).
    pub input_bytes: u64,
    pub kind: WorkKind,
}

pub(crate) enum WorkKind {
    /// Text or JSON Lines: `bytes` start at byte `offset` of the input, after `line` newlines.
    Bytes { offset: u64, line: u64, bytes: Vec<u8> },
    /// Tokens `range` of a token file; the range starts at `<s>` or at the file's start.
    Tokens { stream: Arc<TokenStream>, range: Range<usize> },
}

/// What is being read now.
enum Current {
    Bytes { reader: Box<dyn Read + Send>, carry: Vec<u8>, offset: u64, line: u64 },
    Tokens { stream: Arc<TokenStream>, cursor: usize, bytes_per_token: f64 },
}

/// The inputs, chunk after chunk, in order. Stops early once `stop` is set.
pub(crate) struct WorkSource<'a> {
    inputs: &'a [Input],
    next: usize,
    current: Option<(usize, Current)>,
    chunk_bytes: usize,
    bos: Option<u32>,
    stop: &'a AtomicBool,
}

impl<'a> WorkSource<'a> {
    pub(crate) fn new(
        inputs: &'a [Input],
        chunk_bytes: usize,
        bos: Option<u32>,
        stop: &'a AtomicBool,
    ) -> Self {
        Self { inputs, next: 0, current: None, chunk_bytes: chunk_bytes.max(1), bos, stop }
    }

    fn open(&mut self, index: usize) -> Result<Current> {
        let input = &self.inputs[index];
        Ok(match input.format {
            Format::Text | Format::Jsonl => {
                Current::Bytes { reader: input.reader()?, carry: Vec::new(), offset: 0, line: 0 }
            }
            Format::Tokens => {
                let stream = input.tokens()?;
                let bytes_per_token = input.len()? as f64 / stream.len().max(1) as f64;
                Current::Tokens { stream: Arc::new(stream), cursor: 0, bytes_per_token }
            }
        })
    }

    /// The next chunk of the current input; `None` at its end.
    fn chunk(&mut self, index: usize) -> Result<Option<Work>> {
        let format = self.inputs[index].format;
        let name = &self.inputs[index].name;
        let chunk_bytes = self.chunk_bytes;
        let bos = self.bos;
        let Some((_, current)) = self.current.as_mut() else { return Ok(None) };
        match current {
            Current::Bytes { reader, carry, offset, line } => {
                let mut buf = std::mem::take(carry);
                // Boundaries before `floor` were looked for already.
                let mut floor = 0;
                loop {
                    let before = buf.len();
                    let read = reader
                        .take(chunk_bytes as u64)
                        .read_to_end(&mut buf)
                        .map_err(|source| AuditError::Io { path: name.clone(), source })?;
                    let end = if read == 0 {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        Some(buf.len())
                    } else if format == Format::Text {
                        text_boundary(&buf, floor)
                    } else {
                        memchr::memrchr(b'\n', &buf[floor..]).map(|p| floor + p + 1)
                    };
                    match end {
                        Some(end) => {
                            *carry = buf.split_off(end);
                            let work = WorkKind::Bytes { offset: *offset, line: *line, bytes: buf };
                            let WorkKind::Bytes { bytes, .. } = &work else { unreachable!() };
                            *offset += bytes.len() as u64;
                            *line += memchr::memchr_iter(b'\n', bytes).count() as u64;
                            let input_bytes = bytes.len() as u64;
                            return Ok(Some(Work { input: index, input_bytes, kind: work }));
                        }
                        // One document longer than a chunk: read on, searching only the new
                        // bytes (from the last newline before them).
                        None => floor = memchr::memrchr(b'\n', &buf[..before]).unwrap_or(0),
                    }
                }
            }
            Current::Tokens { stream, cursor, bytes_per_token } => {
                let len = stream.len();
                if *cursor >= len {
                    return Ok(None);
                }
                // About as many tokens as a text chunk has bytes (a token is ~4 bytes of text),
                // ending where the next document starts.
                let target = (*cursor + (chunk_bytes / 4).max(1)).min(len);
                let bos = bos.expect("checked before reading token files");
                let end = next_bos(stream, target, bos);
                let range = *cursor..end;
                *cursor = end;
                let input_bytes = (range.len() as f64 * *bytes_per_token) as u64;
                let kind = WorkKind::Tokens { stream: Arc::clone(stream), range };
                Ok(Some(Work { input: index, input_bytes, kind }))
            }
        }
    }
}

impl Iterator for WorkSource<'_> {
    type Item = Result<Work>;

    fn next(&mut self) -> Option<Result<Work>> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let index = match &self.current {
                Some((index, _)) => *index,
                None => {
                    let index = self.next;
                    if index >= self.inputs.len() {
                        return None;
                    }
                    self.next += 1;
                    match self.open(index) {
                        Ok(current) => self.current = Some((index, current)),
                        Err(e) => return Some(Err(e)),
                    }
                    index
                }
            };
            match self.chunk(index) {
                Ok(Some(work)) => return Some(Ok(work)),
                Ok(None) => self.current = None,
                Err(e) => {
                    self.current = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Bytes that may sit on a blank line (ASCII whitespace; a line of other Unicode spaces is
/// blank too, but need not be found: any blank line is a boundary, not every one has to be).
fn is_blank_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
}

/// The end of the last blank line in `buf` (just after its newline) found from `floor` on;
/// `buf` starts at a line start and `floor` is 0 or the index of a newline.
pub(crate) fn text_boundary(buf: &[u8], floor: usize) -> Option<usize> {
    let mut line_end: Option<usize> = None;
    for newline in memchr::memrchr_iter(b'\n', &buf[floor..]).map(|p| floor + p) {
        if let Some(end) = line_end
            && buf[newline + 1..end].iter().all(|&b| is_blank_byte(b))
        {
            return Some(end + 1);
        }
        line_end = Some(newline);
    }
    match line_end {
        Some(end) if floor == 0 && buf[..end].iter().all(|&b| is_blank_byte(b)) => Some(end + 1),
        _ => None,
    }
}

/// The documents of text that may hold invalid UTF-8 (for `--skip-bad`), by the trainer's rule
/// ([`trainer::data::documents`]): non-blank stretches between blank lines, trimmed. A line
/// that is not UTF-8 is not blank; a document holding one is `Err(())`.
pub(crate) fn byte_documents(bytes: &[u8]) -> Vec<std::result::Result<&str, ()>> {
    let mut out = Vec::new();
    let mut span: Option<(usize, usize)> = None;
    let mut offset = 0;
    let push = |out: &mut Vec<_>, (s, e): (usize, usize)| {
        out.push(std::str::from_utf8(&bytes[s..e]).map(str::trim).map_err(|_| ()));
    };
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let blank = std::str::from_utf8(line).is_ok_and(|l| l.trim().is_empty());
        if blank {
            if let Some(s) = span.take() {
                push(&mut out, s);
            }
        } else {
            let start = span.map_or(offset, |(s, _)| s);
            span = Some((start, offset + line.len()));
        }
        offset += line.len();
    }
    if let Some(s) = span {
        push(&mut out, s);
    }
    out
}

/// The first position at or after `from` that holds `bos`, or the stream's end. Reads the
/// (memory-mapped) stream a piece at a time.
fn next_bos(stream: &TokenStream, from: usize, bos: u32) -> usize {
    const PIECE: usize = 1 << 16;
    let mut at = from;
    while at < stream.len() {
        let n = PIECE.min(stream.len() - at);
        let tokens = stream.read(at, n).expect("within the stream");
        if let Some(p) = tokens.iter().position(|&t| t == bos) {
            return at + p;
        }
        at += n;
    }
    stream.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::data::documents;

    #[test]
    fn text_boundaries_fall_after_blank_lines() {
        assert_eq!(text_boundary(b"a\n\nb", 0), Some(3));
        assert_eq!(text_boundary(b"a\n \t\r\nb\n\nc", 0), Some(9));
        assert_eq!(text_boundary(b"a\nb\nc", 0), None);
        // A blank first line of the buffer.
        assert_eq!(text_boundary(b"\nabc", 0), Some(1));
        // From a floor at a newline: the line after it is seen whole.
        assert_eq!(text_boundary(b"abc\n\nd", 3), Some(5));
    }

    #[test]
    fn byte_documents_match_the_trainers_rule_on_valid_text() {
        let text = "  one\ntwo \n\n \t\nthree\r\n\r\nfour\n\u{a0}\nfive\n";
        let ours: Vec<&str> = byte_documents(text.as_bytes()).into_iter().map(|d| d.unwrap()).collect();
        assert_eq!(ours, documents(text));
        // A line of invalid UTF-8 spoils only its document.
        let mut bytes = b"good\n\nbad \xff\nstill bad\n\nfine".to_vec();
        let docs = byte_documents(&bytes);
        assert_eq!(docs, vec![Ok("good"), Err(()), Ok("fine")]);
        bytes.clear();
        assert!(byte_documents(&bytes).is_empty());
    }

    /// Chunks of any size give the documents of the whole text.
    #[test]
    fn chunking_keeps_documents_whole() {
        let text = "alpha beta\ngamma\n\n\n delta\n \nepsilon zeta eta\n\ntheta";
        let whole = documents(text);
        for chunk_bytes in [1, 2, 3, 5, 8, 13, 1000] {
            let inputs = [Input::memory("t", text.as_bytes().to_vec(), Format::Text)];
            let stop = AtomicBool::new(false);
            let mut docs = Vec::new();
            let mut next_offset = 0;
            for work in WorkSource::new(&inputs, chunk_bytes, None, &stop) {
                let WorkKind::Bytes { offset, bytes, .. } = work.unwrap().kind else { panic!() };
                assert_eq!(offset, next_offset);
                next_offset += bytes.len() as u64;
                let chunk = String::from_utf8(bytes).unwrap();
                docs.extend(documents(&chunk).into_iter().map(str::to_string));
            }
            assert_eq!(next_offset, text.len() as u64);
            assert_eq!(docs, whole, "chunk_bytes {chunk_bytes}");
        }
    }
}
