//! One pass over a document: words, pronoun groups, descriptor terms, personal-data patterns,
//! the duplicate hash and the language, added to a chunk's [`Counts`].
//!
//! The word rule: a word is a maximal run of Unicode letters and digits (`char::is_alphanumeric`:
//! the Alphabetic and Numeric properties); everything else separates words, so "she's" holds
//! "she" and "s". Words are lower-cased with Unicode's full mapping (`str::to_lowercase`).

use crate::lexicon::{self, Lexicon, NONE};
use regex::Regex;
use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_128;

/// Index of each derived pronoun group after the six lists.
pub(crate) const GENDERED: usize = 6;
pub(crate) const ANY_PRONOUN: usize = 7;

/// Personal-data kinds, in report order.
pub(crate) const PII_KINDS: [&str; 3] = ["email", "phone", "ipv4"];

/// The patterns of personal data. ASCII word boundaries (`(?-u:\b)`) keep the regexes on the
/// lazy DFA: a Unicode `\b` falls back to a much slower engine on non-ASCII text.
pub(crate) struct Patterns {
    email: Regex,
    phone: Regex,
    ipv4: Regex,
}

impl Patterns {
    pub(crate) fn new() -> Self {
        let compile = |p: &str| Regex::new(p).expect("a valid built-in pattern");
        // local@domain.tld, the usual address shape (not RFC 5322's quoted forms).
        let email =
            compile(r"(?-u:\b)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?-u:\b)");
        // North American (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567, and
        // international +CC followed by 6–14 digits in groups: separators required, so that
        // plain long numbers (years, ids) do not count.
        let phone = compile(concat!(
            r"(?:\+?1[ .-]?)?(?:\([0-9]{3}\) ?|(?-u:\b)[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}(?-u:\b)",
            r"|\+[0-9]{1,3}(?:[ .-][0-9]{2,5}){2,5}(?-u:\b)",
        ));
        // Four dot-separated numbers 0–255.
        let octet = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
        let ipv4 = compile(&format!(r"(?-u:\b){octet}(?:\.{octet}){{3}}(?-u:\b)"));
        Self { email, phone, ipv4 }
    }
}

/// Byte classes of the word scan: ASCII separators, letters, digits, and the lead or
/// continuation bytes of other characters (decoded and classified by Unicode).
const SEPARATOR: u8 = 0;
const LETTER: u8 = 1;
const DIGIT: u8 = 2;
const ALNUM: u8 = LETTER | DIGIT;
const OTHER: u8 = 4;

static CLASS: [u8; 256] = {
    let mut table = [SEPARATOR; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = if byte >= 0x80 {
            OTHER
        } else if byte.is_ascii_digit() {
            DIGIT
        } else if byte.is_ascii_alphabetic() {
            LETTER
        } else {
            SEPARATOR
        };
        b += 1;
    }
    table
};

/// What the audit needs besides the lexicon.
#[derive(Clone, Debug)]
pub(crate) struct ScanOptions {
    /// Below this whatlang confidence a document's language is unknown.
    pub lang_threshold: f64,
    /// Bytes of each document given to language identification (cut at a character boundary).
    pub lang_prefix: usize,
    /// Identify the language of one document in this many (chosen by content hash); 0: none.
    pub lang_every: u64,
}

/// Counts over some documents; chunks' counts add up.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts {
    pub documents: u64,
    pub empty: u64,
    pub skipped: u64,
    pub words: u64,
    pub bytes: u64,
    pub tokens: u64,
    /// Documents per pronoun group: the six lists, then gendered, then any.
    pub pronouns: [u64; 8],
    pub axes: Vec<u64>,
    pub terms: Vec<u64>,
    pub pii: [u64; 4],
    /// Documents whose language was identified (all, unless sampled).
    pub lang_examined: u64,
    pub languages: FxHashMap<whatlang::Lang, u64>,
    pub lang_unknown: u64,
    /// The duplicate hashes of this chunk's documents, drained by the merge.
    pub hashes: Vec<u128>,
}

impl Counts {
    pub(crate) fn new(lexicon: &Lexicon) -> Self {
        Self { axes: vec![0; lexicon.axes.len()], terms: vec![0; lexicon.terms.len()], ..Self::default() }
    }

    /// Adds `other` into `self`, except its hashes (the caller takes those).
    pub(crate) fn add(&mut self, other: &Counts) {
        self.documents += other.documents;
        self.empty += other.empty;
        self.skipped += other.skipped;
        self.words += other.words;
        self.bytes += other.bytes;
        self.tokens += other.tokens;
        add_all(&mut self.pronouns, &other.pronouns);
        add_all(&mut self.axes, &other.axes);
        add_all(&mut self.terms, &other.terms);
        add_all(&mut self.pii, &other.pii);
        self.lang_examined += other.lang_examined;
        self.lang_unknown += other.lang_unknown;
        for (&lang, &n) in &other.languages {
            *self.languages.entry(lang).or_default() += n;
        }
    }
}

fn add_all(into: &mut [u64], from: &[u64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Scans documents into [`Counts`], reusing its buffers between documents.
pub(crate) struct Scanner<'a> {
    lexicon: &'a Lexicon,
    patterns: &'a Patterns,
    options: &'a ScanOptions,
    pub counts: Counts,
    /// Per term and per axis: the serial of the last document that counted it.
    term_seen: Vec<u64>,
    axis_seen: Vec<u64>,
    serial: u64,
    /// Ids of the last words (at least `max_words`: the term matcher's window), a power of
    /// two long so that a mask, not a division, finds a slot.
    ring: Vec<u32>,
    ring_mask: usize,
    /// Words seen in the document, and the first word a new term match may start at.
    position: usize,
    free_from: usize,
    pronouns: u8,
    lower: Vec<u8>,
    normalized: Vec<u8>,
    double_space: memchr::memmem::Finder<'static>,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(lexicon: &'a Lexicon, patterns: &'a Patterns, options: &'a ScanOptions) -> Self {
        Self {
            lexicon,
            patterns,
            options,
            counts: Counts::new(lexicon),
            term_seen: vec![0; lexicon.terms.len()],
            axis_seen: vec![0; lexicon.axes.len()],
            serial: 0,
            ring: vec![NONE; lexicon.max_words.next_power_of_two()],
            ring_mask: lexicon.max_words.next_power_of_two() - 1,
            position: 0,
            free_from: 0,
            pronouns: 0,
            lower: Vec::with_capacity(64),
            normalized: Vec::new(),
            double_space: memchr::memmem::Finder::new(b"  "),
        }
    }

    /// Audits one document (trimmed here; an empty one only counts as empty).
    pub(crate) fn document(&mut self, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            self.counts.empty += 1;
            return;
        }
        self.serial += 1;
        self.position = 0;
        self.free_from = 0;
        self.pronouns = 0;
        self.counts.documents += 1;
        self.counts.bytes += text.len() as u64;

        let has_digit = self.words(text);
        let has_at = memchr::memchr(b'@', text.as_bytes()).is_some();
        self.finish_terms();

        let p = self.pronouns;
        let pronouns = &mut self.counts.pronouns;
        for (group, count) in pronouns.iter_mut().take(6).enumerate() {
            *count += u64::from(p & (1 << group) != 0);
        }
        pronouns[GENDERED] += u64::from(p & (lexicon::SHE | lexicon::HE) != 0);
        pronouns[ANY_PRONOUN] += u64::from(p != 0);

        // The patterns need an '@' or a digit: most documents skip the regexes altogether.
        let email = has_at && self.patterns.email.is_match(text);
        let phone = has_digit && self.patterns.phone.is_match(text);
        let ipv4 = has_digit && self.patterns.ipv4.is_match(text);
        let pii = &mut self.counts.pii;
        pii[0] += u64::from(email);
        pii[1] += u64::from(phone);
        pii[2] += u64::from(ipv4);
        pii[3] += u64::from(email || phone || ipv4);

        let hash = self.duplicate_hash(text);
        self.counts.hashes.push(hash);

        let every = self.options.lang_every;
        // The sample is chosen by content, so it does not depend on chunking or threads.
        if every > 0 && (hash as u64).is_multiple_of(every) {
            self.language(text);
        }
    }

    /// Counts the words and feeds each to the matchers; whether the text holds a digit. ASCII
    /// bytes are classified by a table in tight loops (separators, then a word's letters and
    /// digits); other characters are decoded and classified by Unicode.
    fn words(&mut self, text: &str) -> bool {
        let bytes = text.as_bytes();
        let n = bytes.len();
        let mut seen = 0u8;
        let mut i = 0;
        'words: loop {
            while i < n && CLASS[bytes[i] as usize] == SEPARATOR {
                i += 1;
            }
            if i >= n {
                break;
            }
            let start = i;
            let mut ascii = true;
            loop {
                while i < n && CLASS[bytes[i] as usize] & ALNUM != 0 {
                    seen |= CLASS[bytes[i] as usize];
                    i += 1;
                }
                if i < n && CLASS[bytes[i] as usize] == OTHER {
                    let c = text[i..].chars().next().expect("i is at a character boundary");
                    i += c.len_utf8();
                    if c.is_alphanumeric() {
                        ascii = false;
                        continue;
                    }
                    // A non-ASCII separator ends the word (or stands alone).
                    if i - c.len_utf8() > start {
                        self.word(&text[start..i - c.len_utf8()], ascii);
                    }
                    continue 'words;
                }
                break;
            }
            self.word(&text[start..i], ascii);
        }
        seen & DIGIT != 0
    }

    #[inline]
    fn word(&mut self, word: &str, ascii: bool) {
        self.counts.words += 1;
        let lexicon = self.lexicon;
        let id = if ascii {
            if lexicon.may_hold_ascii(word.as_bytes()) {
                self.lower.clear();
                self.lower.extend(word.bytes().map(|b| b.to_ascii_lowercase()));
                lexicon.lookup(&self.lower)
            } else {
                NONE
            }
        } else {
            lexicon.lookup(word.to_lowercase().as_bytes())
        };
        if id != NONE {
            self.pronouns |= lexicon.entries[id as usize].pronouns;
        }
        self.ring[self.position & self.ring_mask] = id;
        self.position += 1;
        // The match starting `max_words - 1` words back now has all the words it could need.
        let k = self.lexicon.max_words;
        if self.position >= k {
            let start = self.position - k;
            if self.ring[start & self.ring_mask] != NONE {
                self.try_match(start);
            }
        }
    }

    /// At the end of a document: the starts that had fewer than `max_words` words after them.
    fn finish_terms(&mut self) {
        let k = self.lexicon.max_words;
        for start in self.position.saturating_sub(k - 1)..self.position {
            self.try_match(start);
        }
    }

    /// The longest term starting at word `start`, if that word is not inside an earlier match.
    fn try_match(&mut self, start: usize) {
        if start < self.free_from {
            return;
        }
        let mask = self.ring_mask;
        let id = self.ring[start & mask];
        if id == NONE {
            return;
        }
        let lexicon = self.lexicon;
        let available = self.position - start;
        for &key in &lexicon.entries[id as usize].starts {
            let key = &lexicon.keys[key as usize];
            let n = key.words.len();
            if n > available || (1..n).any(|j| self.ring[(start + j) & mask] != key.words[j]) {
                continue;
            }
            self.free_from = start + n;
            for &term in &key.terms {
                let t = term as usize;
                if self.term_seen[t] != self.serial {
                    self.term_seen[t] = self.serial;
                    self.counts.terms[t] += 1;
                    let axis = lexicon.terms[t].axis as usize;
                    if self.axis_seen[axis] != self.serial {
                        self.axis_seen[axis] = self.serial;
                        self.counts.axes[axis] += 1;
                    }
                }
            }
            return;
        }
    }

    /// xxh3-128 of the text with whitespace runs collapsed to one space (the text is trimmed).
    fn duplicate_hash(&mut self, text: &str) -> u128 {
        let bytes = text.as_bytes();
        self.normalized.clear();
        if bytes.is_ascii() {
            // Char::is_whitespace on ASCII: these six bytes (vertical tab included).
            let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
            // Most documents need no rewriting: only single spaces between non-spaces.
            if !bytes.iter().any(|b| space(b) && *b != b' ') && self.double_space.find(bytes).is_none() {
                return xxh3_128(bytes);
            }
            for piece in bytes.split(space).filter(|p| !p.is_empty()) {
                if !self.normalized.is_empty() {
                    self.normalized.push(b' ');
                }
                self.normalized.extend_from_slice(piece);
            }
        } else {
            for piece in text.split_whitespace() {
                if !self.normalized.is_empty() {
                    self.normalized.push(b' ');
                }
                self.normalized.extend_from_slice(piece.as_bytes());
            }
        }
        xxh3_128(&self.normalized)
    }

    fn language(&mut self, text: &str) {
        self.counts.lang_examined += 1;
        let mut end = text.len().min(self.options.lang_prefix);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        match whatlang::detect(&text[..end]) {
            Some(info) if info.confidence() >= self.options.lang_threshold => {
                *self.counts.languages.entry(info.lang()).or_default() += 1;
            }
            _ => self.counts.lang_unknown += 1,
        }
    }
}
