//! The audit's results: counts of documents and their percentages, as a JSON document and as a
//! table laid out like Table 9 of the Llama 2 paper.

use crate::lexicon::{Lexicon, PRONOUN_GROUPS};
use crate::scan::{ANY_PRONOUN, Counts, GENDERED, PII_KINDS};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::fmt::{self, Write as _};

/// A number of documents and its percentage of a whole.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    pub documents: u64,
    pub percent: f64,
}

impl Share {
    fn of(documents: u64, whole: u64) -> Self {
        Self { documents, percent: percent(documents, whole) }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

/// Documents containing at least one word of each pronoun group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pronouns {
    pub she: Share,
    pub he: Share,
    pub unknown: Share,
    pub first_person: Share,
    pub second_person: Share,
    pub third_person: Share,
    /// She or He.
    pub gendered: Share,
    /// Any word of the six lists.
    pub any: Share,
}

impl Pronouns {
    /// (JSON key, label, share) in report order.
    pub fn rows(&self) -> [(&'static str, &'static str, Share); 8] {
        let label = |i: usize| PRONOUN_GROUPS[i];
        [
            (label(0).0, label(0).1, self.she),
            (label(1).0, label(1).1, self.he),
            (label(2).0, label(2).1, self.unknown),
            (label(3).0, label(3).1, self.first_person),
            (label(4).0, label(4).1, self.second_person),
            (label(5).0, label(5).1, self.third_person),
            ("gendered", "She or He", self.gendered),
            ("any", "any pronoun", self.any),
        ]
    }
}

/// One descriptor term's documents, as a percentage of its axis's documents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TermShare {
    pub term: String,
    pub documents: u64,
    pub percent_of_axis: f64,
}

/// One demographic axis: documents mentioning any of its terms, and every term (most mentioned
/// first, then by term).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub documents: u64,
    pub percent: f64,
    pub terms: Vec<TermShare>,
}

/// The axes in the descriptor lists' order, serialised as one JSON object keyed by axis name.
#[derive(Clone, Debug, PartialEq)]
pub struct Axes(pub Vec<(String, Axis)>);

impl Serialize for Axes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, axis) in &self.0 {
            map.serialize_entry(name, axis)?;
        }
        map.end()
    }
}

/// Documents per detected language.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Languages {
    /// Documents whose language was identified: all of them unless `every` > 1.
    pub examined: u64,
    /// One document in `every` was examined (chosen by content hash).
    pub every: u64,
    /// Best guesses below this confidence count as unknown.
    pub threshold: f64,
    /// Bytes of each document given to the identifier.
    pub prefix_bytes: usize,
    /// Per language (ISO 639-3 code and English name), most documents first; percentages of
    /// `examined`.
    pub detected: Vec<LanguageShare>,
    pub unknown: Share,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LanguageShare {
    pub code: String,
    pub name: String,
    pub documents: u64,
    pub percent: f64,
}

/// Documents with personal-data signals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pii {
    pub email: Share,
    pub phone: Share,
    pub ipv4: Share,
    /// Any of the three.
    pub any: Share,
}

/// Everything the audit reports. Percentages are of `documents` (non-empty documents) unless
/// said otherwise.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub documents: u64,
    pub words: u64,
    /// UTF-8 bytes of the documents' (trimmed) text.
    pub bytes: u64,
    /// Tokens, when a tokenizer was given (or the input was token files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Documents with no text (not counted in `documents`).
    pub empty_documents: u64,
    /// Lines or documents skipped as bad under `--skip-bad`.
    pub skipped: u64,
    pub pronouns: Pronouns,
    pub descriptors: Axes,
    pub languages: Languages,
    pub pii: Pii,
    /// Documents whose normalised text (trimmed, whitespace runs as one space) repeats an
    /// earlier document's: all copies but one.
    pub duplicates: Share,
}

/// How languages were identified (echoed in the report).
pub(crate) struct LanguageSettings {
    pub every: u64,
    pub threshold: f64,
    pub prefix_bytes: usize,
}

impl Report {
    pub(crate) fn new(
        counts: &Counts,
        duplicates: u64,
        lexicon: &Lexicon,
        has_tokens: bool,
        lang: LanguageSettings,
    ) -> Self {
        let n = counts.documents;
        let share = |d: u64| Share::of(d, n);
        let p = &counts.pronouns;
        let pronouns = Pronouns {
            she: share(p[0]),
            he: share(p[1]),
            unknown: share(p[2]),
            first_person: share(p[3]),
            second_person: share(p[4]),
            third_person: share(p[5]),
            gendered: share(p[GENDERED]),
            any: share(p[ANY_PRONOUN]),
        };
        let axes = lexicon
            .axes
            .iter()
            .enumerate()
            .map(|(a, name)| {
                let documents = counts.axes[a];
                let mut terms: Vec<TermShare> = lexicon
                    .terms
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.axis as usize == a)
                    .map(|(t, term)| TermShare {
                        term: term.text.clone(),
                        documents: counts.terms[t],
                        percent_of_axis: percent(counts.terms[t], documents),
                    })
                    .collect();
                terms.sort_by(|x, y| y.documents.cmp(&x.documents).then_with(|| x.term.cmp(&y.term)));
                (name.clone(), Axis { documents, percent: percent(documents, n), terms })
            })
            .collect();
        let examined = counts.lang_examined;
        let mut detected: Vec<LanguageShare> = counts
            .languages
            .iter()
            .map(|(lang, &d)| LanguageShare {
                code: lang.code().to_string(),
                name: lang.eng_name().to_string(),
                documents: d,
                percent: percent(d, examined),
            })
            .collect();
        detected.sort_by(|x, y| y.documents.cmp(&x.documents).then_with(|| x.code.cmp(&y.code)));
        let languages = Languages {
            examined,
            every: lang.every,
            threshold: lang.threshold,
            prefix_bytes: lang.prefix_bytes,
            detected,
            unknown: Share::of(counts.lang_unknown, examined),
        };
        let pii = Pii {
            email: share(counts.pii[0]),
            phone: share(counts.pii[1]),
            ipv4: share(counts.pii[2]),
            any: share(counts.pii[3]),
        };
        Self {
            documents: n,
            words: counts.words,
            bytes: counts.bytes,
            tokens: has_tokens.then_some(counts.tokens),
            empty_documents: counts.empty,
            skipped: counts.skipped,
            pronouns,
            descriptors: Axes(axes),
            languages,
            pii,
            duplicates: share(duplicates),
        }
    }

    /// The report as a terminal table (top five terms per axis).
    pub fn table(&self) -> String {
        let mut out = String::new();
        self.write_table(&mut out).expect("writing to a String cannot fail");
        out
    }

    fn write_table(&self, out: &mut String) -> fmt::Result {
        write!(out, "{} documents, {} words, {} bytes", self.documents, self.words, self.bytes)?;
        if let Some(tokens) = self.tokens {
            write!(out, ", {tokens} tokens")?;
        }
        if self.empty_documents > 0 || self.skipped > 0 {
            write!(out, " ({} empty documents, {} skipped as bad)", self.empty_documents, self.skipped)?;
        }
        writeln!(out)?;

        writeln!(out, "\n{:<22} {:>12} {:>8}", "Pronouns", "documents", "%")?;
        for (_, label, share) in self.pronouns.rows() {
            writeln!(out, "{label:<22} {:>12} {:>8.2}", share.documents, share.percent)?;
        }

        writeln!(
            out,
            "\n{:<22} {:>12} {:>8}   top terms (% of the axis's documents)",
            "Demographic axis", "documents", "%"
        )?;
        for (name, axis) in &self.descriptors.0 {
            let top: Vec<String> = axis
                .terms
                .iter()
                .filter(|t| t.documents > 0)
                .take(5)
                .map(|t| format!("{} ({:.1})", t.term, t.percent_of_axis))
                .collect();
            let line =
                format!("{name:<22} {:>12} {:>8.2}   {}", axis.documents, axis.percent, top.join(", "));
            writeln!(out, "{}", line.trim_end())?;
        }

        let lang = &self.languages;
        let sampled =
            if lang.every > 1 { format!(", one document in {}", lang.every) } else { String::new() };
        writeln!(
            out,
            "\n{:<22} {:>12} {:>8}   (whatlang on the first {} bytes{sampled})",
            "Language", "documents", "%", lang.prefix_bytes
        )?;
        for l in &lang.detected {
            let label = format!("{} ({})", l.name, l.code);
            writeln!(out, "{label:<22} {:>12} {:>8.2}", l.documents, l.percent)?;
        }
        let label = format!("unknown (< {})", lang.threshold);
        writeln!(out, "{label:<22} {:>12} {:>8.2}", lang.unknown.documents, lang.unknown.percent)?;

        writeln!(out, "\n{:<22} {:>12} {:>8}", "Personal data", "documents", "%")?;
        let pii = [
            ("e-mail address", self.pii.email),
            ("phone number", self.pii.phone),
            ("IPv4 address", self.pii.ipv4),
            ("any of these", self.pii.any),
        ];
        debug_assert_eq!(PII_KINDS.len() + 1, pii.len());
        for (label, share) in pii {
            writeln!(out, "{label:<22} {:>12} {:>8.2}", share.documents, share.percent)?;
        }
        writeln!(
            out,
            "\n{:<22} {:>12} {:>8.2}",
            "Exact duplicates", self.duplicates.documents, self.duplicates.percent
        )
    }
}
