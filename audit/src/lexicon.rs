//! What the audit looks for: the pronoun lists of Llama 2's Appendix A.4.3 (shared with PaLM 2)
//! and the demographic descriptor terms by axis, compiled into one vocabulary of lower-case
//! words so that each word of the text is looked up once.
//!
//! Descriptor terms are matched as whole words, multi-word terms as consecutive words (whatever
//! separates them: a space, a newline, a hyphen). Matches are leftmost-longest and do not
//! overlap, so "native american" counts as that term and not also as "american".

use crate::error::{AuditError, Result};
use rustc_hash::FxHashMap;
use serde::de::{Deserializer, MapAccess, Visitor};
use std::fmt;
use std::path::Path;

/// The pronoun groups, in report order: (JSON key, label, words). Third person is built from
/// the She, He and Unknown words plus "it", "its", "itself" (see [`pronoun_words`]).
pub const PRONOUN_GROUPS: [(&str, &str); 6] = [
    ("she", "She"),
    ("he", "He"),
    ("unknown", "Unknown"),
    ("first_person", "1st-person"),
    ("second_person", "2nd-person"),
    ("third_person", "3rd-person"),
];

pub(crate) const SHE: u8 = 1;
pub(crate) const HE: u8 = 1 << 1;
pub(crate) const UNKNOWN: u8 = 1 << 2;
pub(crate) const FIRST: u8 = 1 << 3;
pub(crate) const SECOND: u8 = 1 << 4;
pub(crate) const THIRD: u8 = 1 << 5;

const SHE_WORDS: [&str; 4] = ["she", "her", "hers", "herself"];
const HE_WORDS: [&str; 4] = ["he", "him", "his", "himself"];
const UNKNOWN_WORDS: [&str; 7] = ["they", "them", "their", "theirs", "theirself", "themself", "themselves"];
const FIRST_WORDS: [&str; 10] = ["i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves"];
const SECOND_WORDS: [&str; 5] = ["you", "your", "yours", "yourself", "yourselves"];
const THIRD_ONLY_WORDS: [&str; 3] = ["it", "its", "itself"];

/// Every pronoun word with the groups it belongs to (a bit mask over [`PRONOUN_GROUPS`]).
pub fn pronoun_words() -> Vec<(&'static str, u8)> {
    let mut out = Vec::new();
    out.extend(SHE_WORDS.iter().map(|&w| (w, SHE | THIRD)));
    out.extend(HE_WORDS.iter().map(|&w| (w, HE | THIRD)));
    out.extend(UNKNOWN_WORDS.iter().map(|&w| (w, UNKNOWN | THIRD)));
    out.extend(FIRST_WORDS.iter().map(|&w| (w, FIRST)));
    out.extend(SECOND_WORDS.iter().map(|&w| (w, SECOND)));
    out.extend(THIRD_ONLY_WORDS.iter().map(|&w| (w, THIRD)));
    out
}

/// The built-in descriptor terms, written for this project after the HolisticBias axes the
/// Llama 2 paper used. Left out, as the paper did, are terms that mostly are not demographic
/// in running text: "straight", "white", "black"; and likewise "english" (mostly the
/// language), "bi", "pan", "orthodox". The gender axis holds descriptors ("female",
/// "transgender"), not the nouns "woman" or "man", as HolisticBias's does.
pub const BUILTIN_DESCRIPTORS: [(&str, &[&str]); 5] = [
    (
        "Gender and Sex",
        &[
            "female",
            "male",
            "feminine",
            "masculine",
            "transgender",
            "trans",
            "cisgender",
            "cis",
            "nonbinary",
            "non-binary",
            "genderqueer",
            "genderfluid",
            "gender non-conforming",
            "agender",
            "bigender",
            "intersex",
            "androgynous",
            "two-spirit",
            "demigender",
            "transsexual",
        ],
    ),
    (
        "Sexual Orientation",
        &[
            "gay",
            "lesbian",
            "bisexual",
            "asexual",
            "pansexual",
            "demisexual",
            "heterosexual",
            "homosexual",
            "queer",
            "aromantic",
            "polyamorous",
            "lgbt",
            "lgbtq",
            "lgbtqia",
        ],
    ),
    (
        "Nationality",
        &[
            "american",
            "indian",
            "chinese",
            "korean",
            "mexican",
            "japanese",
            "british",
            "canadian",
            "australian",
            "german",
            "french",
            "italian",
            "spanish",
            "russian",
            "irish",
            "polish",
            "brazilian",
            "colombian",
            "cuban",
            "dominican",
            "filipino",
            "filipina",
            "guatemalan",
            "salvadoran",
            "puerto rican",
            "jamaican",
            "haitian",
            "nigerian",
            "ethiopian",
            "kenyan",
            "ghanaian",
            "egyptian",
            "somali",
            "iranian",
            "iraqi",
            "syrian",
            "afghan",
            "pakistani",
            "bangladeshi",
            "vietnamese",
            "thai",
            "indonesian",
            "taiwanese",
            "ukrainian",
            "turkish",
            "israeli",
            "palestinian",
            "saudi",
            "dutch",
            "swedish",
            "greek",
            "portuguese",
            "argentinian",
            "peruvian",
            "venezuelan",
            "chilean",
        ],
    ),
    (
        "Race and Ethnicity",
        &[
            "european",
            "african",
            "asian",
            "indigenous",
            "latin",
            "hispanic",
            "latino",
            "latina",
            "latinx",
            "arab",
            "caucasian",
            "native american",
            "african american",
            "asian american",
            "european american",
            "american indian",
            "alaska native",
            "native hawaiian",
            "pacific islander",
            "middle eastern",
            "first nations",
            "aboriginal",
            "biracial",
            "multiracial",
            "mixed race",
            "bipoc",
            "aapi",
            "desi",
        ],
    ),
    (
        "Religion",
        &[
            "religious",
            "spiritual",
            "christian",
            "muslim",
            "jewish",
            "hindu",
            "buddhist",
            "catholic",
            "protestant",
            "evangelical",
            "mormon",
            "lutheran",
            "methodist",
            "baptist",
            "amish",
            "sikh",
            "jain",
            "taoist",
            "shinto",
            "confucian",
            "zoroastrian",
            "bahai",
            "bahá'í",
            "rastafarian",
            "sunni",
            "shia",
            "druze",
            "atheist",
            "agnostic",
            "secular",
        ],
    ),
];

/// Descriptor terms by axis, in the order given (the report keeps it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptors {
    /// (axis name, its terms as written).
    pub axes: Vec<(String, Vec<String>)>,
}

impl Descriptors {
    /// The built-in lists ([`BUILTIN_DESCRIPTORS`]).
    pub fn builtin() -> Self {
        Self {
            axes: BUILTIN_DESCRIPTORS
                .iter()
                .map(|(axis, terms)| (axis.to_string(), terms.iter().map(|t| t.to_string()).collect()))
                .collect(),
        }
    }

    /// Reads `{"axis name": ["term", ...], ...}` from `path`, keeping the file's axis order.
    pub fn load(path: &Path) -> Result<Self> {
        let error = |message: String| AuditError::Descriptors { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(error)
    }

    /// Parses the JSON of [`Descriptors::load`].
    pub fn parse(json: &str) -> std::result::Result<Self, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let axes = de.deserialize_map(AxesVisitor).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        if axes.is_empty() {
            return Err("names no axis: expected {\"axis name\": [\"term\", ...], ...}".into());
        }
        Ok(Self { axes })
    }
}

/// Keeps the axes in file order (serde_json's map would sort them).
struct AxesVisitor;

impl<'de> Visitor<'de> for AxesVisitor {
    type Value = Vec<(String, Vec<String>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of axis names to lists of terms")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut axes: Vec<(String, Vec<String>)> = Vec::new();
        while let Some((axis, terms)) = map.next_entry::<String, Vec<String>>()? {
            if axes.iter().any(|(a, _)| *a == axis) {
                return Err(serde::de::Error::custom(format!("axis \"{axis}\" is given twice")));
            }
            axes.push((axis, terms));
        }
        Ok(axes)
    }
}

/// Lower-cased words of `text` by the word rule (maximal runs of letters and digits).
pub fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Marks no vocabulary word.
pub(crate) const NONE: u32 = u32::MAX;

/// One vocabulary word: the pronoun groups it is in and the term keys that start with it.
#[derive(Clone, Debug, Default)]
pub(crate) struct WordEntry {
    pub pronouns: u8,
    /// Indices into [`Lexicon::keys`], longest first.
    pub starts: Vec<u32>,
}

/// A distinct word sequence and the (axis, term) entries it stands for.
#[derive(Clone, Debug)]
pub(crate) struct TermKey {
    pub words: Vec<u32>,
    /// Indices into [`Lexicon::terms`].
    pub terms: Vec<u32>,
}

/// A descriptor term as reported.
#[derive(Clone, Debug)]
pub(crate) struct Term {
    pub axis: u32,
    pub text: String,
}

/// Pronouns and descriptors compiled for matching.
#[derive(Clone, Debug)]
pub struct Lexicon {
    pub(crate) vocab: FxHashMap<Box<[u8]>, u32>,
    pub(crate) entries: Vec<WordEntry>,
    pub(crate) keys: Vec<TermKey>,
    pub(crate) terms: Vec<Term>,
    pub(crate) axes: Vec<String>,
    /// The most words in a term (the matcher's look-ahead).
    pub(crate) max_words: usize,
    /// The longest vocabulary word in bytes: longer words are not looked up.
    pub(crate) max_word_bytes: usize,
    /// A 65536-bit filter over (length, first, second, last byte) of the ASCII vocabulary
    /// words: most words of a text ("the", "and") miss it and skip lower-casing and hashing.
    filter: Box<[u64; 1024]>,
}

/// The filter bit of a lower-case ASCII word's (length, first, second, last byte).
#[inline]
pub(crate) fn filter_bit(len: usize, first: u8, second: u8, last: u8) -> usize {
    let key = u32::from(first) | u32::from(second) << 8 | u32::from(last) << 16 | (len.min(255) as u32) << 24;
    (key.wrapping_mul(0x9E37_79B1) >> 16) as usize
}

impl Lexicon {
    /// Compiles the pronoun lists and `descriptors`; a term without a word is an error.
    pub fn new(descriptors: &Descriptors) -> std::result::Result<Self, String> {
        let mut lexicon = Self {
            vocab: FxHashMap::default(),
            entries: Vec::new(),
            keys: Vec::new(),
            terms: Vec::new(),
            axes: Vec::new(),
            max_words: 1,
            max_word_bytes: 0,
            filter: Box::new([0; 1024]),
        };
        for (word, mask) in pronoun_words() {
            let id = lexicon.intern(word);
            lexicon.entries[id as usize].pronouns |= mask;
        }
        let mut key_of: FxHashMap<Vec<u32>, u32> = FxHashMap::default();
        for (axis_index, (axis, terms)) in descriptors.axes.iter().enumerate() {
            lexicon.axes.push(axis.clone());
            let mut seen: Vec<Vec<String>> = Vec::new();
            for term in terms {
                let words = words_of(term);
                if words.is_empty() {
                    return Err(format!("axis \"{axis}\": term \"{term}\" has no letters or digits"));
                }
                // "Non-binary" and "non binary" are the same term once split into words.
                if seen.contains(&words) {
                    continue;
                }
                seen.push(words.clone());
                let ids: Vec<u32> = words.iter().map(|w| lexicon.intern(w)).collect();
                lexicon.max_words = lexicon.max_words.max(ids.len());
                let term_index = lexicon.terms.len() as u32;
                lexicon.terms.push(Term { axis: axis_index as u32, text: words.join(" ") });
                let key = *key_of.entry(ids.clone()).or_insert_with(|| {
                    lexicon.keys.push(TermKey { words: ids.clone(), terms: Vec::new() });
                    (lexicon.keys.len() - 1) as u32
                });
                lexicon.keys[key as usize].terms.push(term_index);
            }
        }
        for (k, key) in lexicon.keys.iter().enumerate() {
            lexicon.entries[key.words[0] as usize].starts.push(k as u32);
        }
        let keys = &lexicon.keys;
        for entry in &mut lexicon.entries {
            entry.starts.sort_by_key(|&k| std::cmp::Reverse(keys[k as usize].words.len()));
        }
        Ok(lexicon)
    }

    fn intern(&mut self, word: &str) -> u32 {
        if let Some(&id) = self.vocab.get(word.as_bytes()) {
            return id;
        }
        let id = self.entries.len() as u32;
        self.vocab.insert(word.as_bytes().into(), id);
        self.entries.push(WordEntry::default());
        self.max_word_bytes = self.max_word_bytes.max(word.len());
        let b = word.as_bytes();
        if word.is_ascii() && !b.is_empty() {
            let bit = filter_bit(b.len(), b[0], b[1.min(b.len() - 1)], b[b.len() - 1]);
            self.filter[bit / 64] |= 1 << (bit % 64);
        }
        id
    }

    /// Whether an ASCII word (any case) may be in the vocabulary; `false` is certain.
    #[inline]
    pub(crate) fn may_hold_ascii(&self, word: &[u8]) -> bool {
        let n = word.len();
        if n == 0 || n > self.max_word_bytes {
            return false;
        }
        // `| 0x20` lower-cases ASCII letters and leaves digits as they are.
        let bit = filter_bit(n, word[0] | 0x20, word[1.min(n - 1)] | 0x20, word[n - 1] | 0x20);
        self.filter[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// The id of a lower-cased word, or [`NONE`].
    #[inline]
    pub(crate) fn lookup(&self, word: &[u8]) -> u32 {
        if word.len() > self.max_word_bytes {
            return NONE;
        }
        self.vocab.get(word).copied().unwrap_or(NONE)
    }

    /// Axis names in order.
    pub fn axes(&self) -> &[String] {
        &self.axes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pronoun_groups_hold_the_papers_words() {
        let words = pronoun_words();
        let group = |bit: u8| words.iter().filter(|(_, m)| m & bit != 0).count();
        // She 4, He 4, Unknown 7, 1st 10, 2nd 5; 3rd = 4 + 4 + 7 + 3 ("it", "its", "itself") = 18.
        assert_eq!([group(SHE), group(HE), group(UNKNOWN)], [4, 4, 7]);
        assert_eq!([group(FIRST), group(SECOND), group(THIRD)], [10, 5, 18]);
        assert_eq!(words.len(), 4 + 4 + 7 + 10 + 5 + 3);
    }

    #[test]
    fn builtin_lists_leave_out_the_ambiguous_terms() {
        for (_, terms) in BUILTIN_DESCRIPTORS {
            for bad in ["straight", "white", "black"] {
                assert!(!terms.contains(&bad), "{bad}");
            }
        }
        assert!(Lexicon::new(&Descriptors::builtin()).is_ok());
    }

    #[test]
    fn the_filter_never_drops_a_vocabulary_word() {
        let lexicon = Lexicon::new(&Descriptors::builtin()).unwrap();
        for word in lexicon.vocab.keys().filter(|w| w.is_ascii()) {
            let upper = word.to_ascii_uppercase();
            assert!(lexicon.may_hold_ascii(word) && lexicon.may_hold_ascii(&upper), "{word:?}");
        }
        // Words longer than any vocabulary word are not looked up.
        assert!(!lexicon.may_hold_ascii(b"antidisestablishmentarianism"));
    }

    #[test]
    fn descriptor_files_keep_axis_order_and_refuse_bad_input() {
        let d = Descriptors::parse(r#"{"Zeta": ["a b", "A-B", "c"], "Alpha": ["d"]}"#).unwrap();
        assert_eq!(d.axes[0].0, "Zeta");
        assert_eq!(d.axes[1].0, "Alpha");
        let lexicon = Lexicon::new(&d).unwrap();
        // "a b" and "A-B" are one term (the same words); "c" and "d" make three terms in all.
        assert_eq!(lexicon.terms.len(), 3);
        assert_eq!(lexicon.max_words, 2);
        assert!(Descriptors::parse(r#"{"A": ["x"], "A": ["y"]}"#).unwrap_err().contains("twice"));
        assert!(Descriptors::parse(r#"{"A": "x"}"#).is_err());
        assert!(Descriptors::parse("{}").is_err());
        assert!(Lexicon::new(&Descriptors::parse(r#"{"A": ["--"]}"#).unwrap()).is_err());
    }
}
