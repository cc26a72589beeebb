//! The pretraining-data audit of Llama 2 (§4.1, "Safety in Pretraining"): who and what a
//! corpus talks about, before training on it. Documents are the unit, as in the paper:
//!
//! - pronouns: documents containing a word of each of the paper's lists ([`lexicon`]);
//! - demographic descriptors: documents mentioning each axis and each term;
//! - languages: documents per language identified by `whatlang`, below a confidence threshold
//!   unknown;
//! - personal-data signals: e-mail addresses, phone numbers, IPv4 addresses (regexes);
//! - exact duplicates: documents whose normalised text repeats (xxh3-128);
//! - totals: documents, words, bytes, tokens.
//!
//! Words follow one rule everywhere: a word is a maximal run of Unicode letters and digits;
//! everything else separates words ("she's" is "she" and "s"); matching is on Unicode
//! lower-case.
//!
//! [`audit`] streams the inputs in chunks of whole documents ([`input`]) audited in parallel
//! on rayon's threads; memory is a few chunks per thread plus 16 bytes per distinct document
//! (the duplicate hashes), plus one token file at a time for token inputs.

pub mod error;
pub mod input;
pub mod lexicon;
pub mod report;
mod scan;

pub use error::{AuditError, Result};
pub use input::{Format, Input};
pub use lexicon::{Descriptors, Lexicon};
pub use report::Report;

use input::{WorkKind, WorkSource};
use rayon::iter::{ParallelBridge, ParallelIterator};
use rustc_hash::FxHashSet;
use scan::{Counts, Patterns, ScanOptions, Scanner};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use trainer::tokenizer::TextTokenizer;

/// How to audit.
#[derive(Clone)]
pub struct Options {
    /// The JSON Lines field holding a document's text.
    pub text_field: String,
    /// Count and skip invalid UTF-8 documents and bad JSON lines instead of stopping.
    pub skip_bad: bool,
    /// Language guesses below this whatlang confidence count as unknown.
    pub lang_threshold: f64,
    /// Bytes of each document given to language identification.
    pub lang_prefix: usize,
    /// Identify the language of one document in this many (1: every document; 0: none).
    pub lang_every: u64,
    /// Counts tokens of text inputs; decodes token inputs (required for those).
    pub tokenizer: Option<TextTokenizer>,
    pub descriptors: Descriptors,
    /// Worker threads (default: rayon's, one per core).
    pub threads: Option<usize>,
    /// Bytes per chunk of work: 1 MiB by default, small enough to keep both cores busy to the
    /// end (a chunk of short documents takes ~0.2 s with language identification), large
    /// enough that merging (a lock per chunk) costs nothing measurable.
    pub chunk_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            text_field: "text".into(),
            skip_bad: false,
            lang_threshold: 0.5,
            lang_prefix: 1024,
            lang_every: 1,
            tokenizer: None,
            descriptors: Descriptors::builtin(),
            threads: None,
            chunk_bytes: 1 << 20,
        }
    }
}

/// Everything a worker reads.
struct Context<'a> {
    inputs: &'a [Input],
    options: &'a Options,
    lexicon: &'a Lexicon,
    patterns: &'a Patterns,
    scan: &'a ScanOptions,
}

/// The running totals.
struct Totals {
    counts: Counts,
    seen: FxHashSet<u128>,
    duplicates: u64,
}

/// Audits `inputs` as one corpus. `progress(input_bytes, documents)` is called from the worker
/// threads after each chunk with what that chunk added.
pub fn audit(inputs: &[Input], options: &Options, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Report> {
    let (lexicon, scan) = prepare(options)?;
    let patterns = Patterns::new();
    let bos = match (&options.tokenizer, inputs.iter().find(|i| i.format == Format::Tokens)) {
        (_, None) => None,
        (None, Some(input)) => {
            return Err(AuditError::Options(format!(
                "{} is a token file: decoding it needs --tokenizer",
                input.name.display()
            )));
        }
        (Some(tokenizer), Some(_)) => Some(tokenizer.bos().ok_or_else(|| {
            AuditError::Options(format!(
                "tokenizer {} has no <s> (or <|begin_of_text|>): token files cannot be split into documents",
                tokenizer.origin
            ))
        })?),
    };
    let context = Context { inputs, options, lexicon: &lexicon, patterns: &patterns, scan: &scan };
    let totals =
        Mutex::new(Totals { counts: Counts::new(&lexicon), seen: FxHashSet::default(), duplicates: 0 });
    // The error of the earliest chunk: chunks before it were all handed out, so the first
    // error in the corpus is the one reported, whatever the threads' timing.
    let first_error: Mutex<Option<(usize, AuditError)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);

    let run = || {
        WorkSource::new(inputs, options.chunk_bytes, bos, &stop).enumerate().par_bridge().for_each(
            |(n, work)| {
                let input_bytes = work.as_ref().map_or(0, |w| w.input_bytes);
                match work.and_then(|w| process(&context, w)) {
                    Ok(mut counts) => {
                        let hashes = std::mem::take(&mut counts.hashes);
                        let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
                        totals.counts.add(&counts);
                        for hash in hashes {
                            if !totals.seen.insert(hash) {
                                totals.duplicates += 1;
                            }
                        }
                        drop(totals);
                        progress(input_bytes, counts.documents + counts.empty);
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                        if first.as_ref().is_none_or(|(m, _)| n < *m) {
                            *first = Some((n, e));
                        }
                    }
                }
            },
        )
    };
    match options.threads {
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| AuditError::Options(format!("cannot start {threads} threads: {e}")))?
            .install(run),
        None => run(),
    }
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let has_tokens = options.tokenizer.is_some();
    let lang = report::LanguageSettings {
        every: options.lang_every,
        threshold: options.lang_threshold,
        prefix_bytes: options.lang_prefix,
    };
    Ok(Report::new(&totals.counts, totals.duplicates, &lexicon, has_tokens, lang))
}

/// Audits documents given as strings (each is trimmed; empty ones are counted as such).
pub fn audit_documents<'a>(
    documents: impl IntoIterator<Item = &'a str>,
    options: &Options,
) -> Result<Report> {
    let (lexicon, scan) = prepare(options)?;
    let patterns = Patterns::new();
    let mut scanner = Scanner::new(&lexicon, &patterns, &scan);
    for doc in documents {
        count_tokens(options, &mut scanner.counts, doc)?;
        scanner.document(doc);
    }
    let mut seen = FxHashSet::default();
    let duplicates = scanner.counts.hashes.iter().filter(|&&h| !seen.insert(h)).count() as u64;
    let lang = report::LanguageSettings {
        every: options.lang_every,
        threshold: options.lang_threshold,
        prefix_bytes: options.lang_prefix,
    };
    Ok(Report::new(&scanner.counts, duplicates, &lexicon, options.tokenizer.is_some(), lang))
}

/// The compiled lexicon and the scan settings, once the options are checked.
fn prepare(options: &Options) -> Result<(Lexicon, ScanOptions)> {
    let lexicon =
        Lexicon::new(&options.descriptors).map_err(|e| AuditError::Options(format!("descriptors: {e}")))?;
    if !(0.0..=1.0).contains(&options.lang_threshold) {
        return Err(AuditError::Options(format!(
            "the language threshold {} is not within 0..=1",
            options.lang_threshold
        )));
    }
    let scan = ScanOptions {
        lang_threshold: options.lang_threshold,
        lang_prefix: options.lang_prefix.max(1),
        lang_every: options.lang_every,
    };
    Ok((lexicon, scan))
}

/// Tokens of a text document as the trainer writes it: the tokenizer's encoding with special
/// tokens (`<s>` first) of the trimmed text; none for an empty document.
fn count_tokens(options: &Options, counts: &mut Counts, doc: &str) -> Result<()> {
    if let Some(tokenizer) = &options.tokenizer {
        let doc = doc.trim();
        if !doc.is_empty() {
            counts.tokens += tokenizer.encode(doc, true)?.len() as u64;
        }
    }
    Ok(())
}

/// Audits one chunk.
fn process(cx: &Context, work: input::Work) -> Result<Counts> {
    let mut scanner = Scanner::new(cx.lexicon, cx.patterns, cx.scan);
    let input = &cx.inputs[work.input];
    let path = &input.name;
    match work.kind {
        WorkKind::Bytes { offset, line, bytes } => {
            let text = match std::str::from_utf8(&bytes) {
                Ok(text) => Some(text),
                Err(_) if cx.options.skip_bad => None,
                Err(e) => {
                    let at = e.valid_up_to();
                    let newlines = memchr::memchr_iter(b'\n', &bytes[..at]).count() as u64;
                    return Err(AuditError::Utf8 {
                        path: path.clone(),
                        line: line + newlines + 1,
                        offset: offset + at as u64,
                    });
                }
            };
            match (input.format, text) {
                (Format::Text, Some(text)) => {
                    for doc in trainer::data::documents(text) {
                        count_tokens(cx.options, &mut scanner.counts, doc)?;
                        scanner.document(doc);
                    }
                }
                (Format::Text, None) => {
                    for doc in input::byte_documents(&bytes) {
                        match doc {
                            Ok(doc) => {
                                count_tokens(cx.options, &mut scanner.counts, doc)?;
                                scanner.document(doc);
                            }
                            Err(()) => scanner.counts.skipped += 1,
                        }
                    }
                }
                (Format::Tokens, _) => unreachable!("token files come as token ranges"),
                (Format::Jsonl, _) => {
                    for (n, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                        let number = line + n as u64 + 1;
                        let Ok(raw) = std::str::from_utf8(raw) else {
                            // Only reached under --skip-bad (the chunk was checked above).
                            scanner.counts.skipped += 1;
                            continue;
                        };
                        if raw.trim().is_empty() {
                            continue;
                        }
                        match json_text(raw, &cx.options.text_field) {
                            Ok(Some(doc)) => {
                                count_tokens(cx.options, &mut scanner.counts, &doc)?;
                                scanner.document(&doc);
                            }
                            Err(_) | Ok(None) if cx.options.skip_bad => scanner.counts.skipped += 1,
                            Ok(None) => {
                                return Err(AuditError::MissingField {
                                    path: path.clone(),
                                    line: number,
                                    field: cx.options.text_field.clone(),
                                });
                            }
                            Err(message) => {
                                return Err(AuditError::Json { path: path.clone(), line: number, message });
                            }
                        }
                    }
                }
            }
        }
        WorkKind::Tokens { stream, range } => {
            let tokenizer = cx.options.tokenizer.as_ref().expect("checked before reading token files");
            let bos = tokenizer.bos().expect("checked before reading token files");
            let tokens = stream.read(range.start, range.len()).expect("chunks lie within the stream");
            scanner.counts.tokens += range.len() as u64;
            // A document is what follows a <s> up to the next (maybe nothing), plus whatever
            // precedes the file's first <s>. Positions are within the chunk.
            let range = 0..tokens.len();
            let mut start = 0;
            let mut after_bos = false;
            let decode = |scanner: &mut Scanner, ids: &[u32]| -> Result<()> {
                let text = tokenizer.decode(ids, true)?;
                scanner.document(&text);
                Ok(())
            };
            for i in range.clone() {
                if tokens[i] == bos {
                    if after_bos || i > start {
                        decode(&mut scanner, &tokens[start..i])?;
                    }
                    start = i + 1;
                    after_bos = true;
                }
            }
            if after_bos || start < range.end {
                decode(&mut scanner, &tokens[start..range.end])?;
            }
        }
    }
    Ok(scanner.counts)
}

/// The text field of a JSON line: `Ok(None)` if the object lacks it, `Err` for a line that is
/// not a JSON object or whose field is not a string. Borrows the text when it has no escapes.
fn json_text<'a>(line: &'a str, field: &str) -> std::result::Result<Option<Cow<'a, str>>, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let text = (FieldSeed { field }).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(text)
}

/// Picks one field of a JSON object, skipping the others without building them.
struct FieldSeed<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a JSON object with a string field \"{}\"", self.field)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut text = None;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.field))? {
            if is_field && text.is_none() {
                text = Some(map.next_value_seed(TextSeed(self.field))?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(text)
    }
}

/// Whether a key is the wanted field (compared without allocating).
struct KeyIs<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> std::result::Result<bool, E> {
        Ok(key == self.0)
    }
}

/// A string value, borrowed when it has no escapes.
struct TextSeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a string in field \"{}\"", self.0)
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> std::result::Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}
