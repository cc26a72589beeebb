//! The audit's counts on small corpora, each expected number worked out by hand in the
//! comments; the three input formats agreeing; bad input named by file and line.

use audit::report::Share;
use audit::{AuditError, Descriptors, Format, Input, Options, Report, audit, audit_documents};
use trainer::data::{documents, encode_llmc_u16};
use trainer::tokenizer::TextTokenizer;

fn share(documents: u64, whole: u64) -> Share {
    Share { documents, percent: 100.0 * documents as f64 / whole as f64 }
}

/// Audits `text` in the trainer's text format, in chunks of `chunk_bytes`.
fn audit_text(text: &str, options: &Options) -> Result<Report, AuditError> {
    let inputs = [Input::memory("corpus.txt", text.as_bytes().to_vec(), Format::Text)];
    audit(&inputs, options, &|_, _| {})
}

fn no_languages() -> Options {
    Options { lang_every: 0, ..Options::default() }
}

#[test]
fn pronouns_are_whole_words_in_any_case() {
    let text = "She's here. HERSELF,\nhe said it.\n\n\
                They told me: \"Your turn.\"\n\n\
                Herald hero Shea thence hisself\n\n\
                I\n\n\
                ITS ITSELF\n";
    // D1: she, s, here, herself, he, said, it (7 words): She (she, herself — "She's" is "she"
    //     and "s"; "HERSELF," ends a line), He (he), 3rd (she, he, it).
    // D2: they, told, me, your, turn (5): Unknown, 3rd (they), 1st (me), 2nd (your).
    // D3: herald, hero, shea, thence, hisself (5): no pronoun (prefixes do not count, and
    //     "hisself" is on no list).
    // D4: i (1): 1st.
    // D5: its, itself (2): 3rd only.
    let report = audit_text(text, &no_languages()).unwrap();
    assert_eq!(report.documents, 5);
    assert_eq!(report.words, 7 + 5 + 5 + 1 + 2);
    let p = &report.pronouns;
    assert_eq!(p.she, share(1, 5)); // D1: 20%
    assert_eq!(p.he, share(1, 5)); // D1
    assert_eq!(p.unknown, share(1, 5)); // D2
    assert_eq!(p.first_person, share(2, 5)); // D2, D4: 40%
    assert_eq!(p.second_person, share(1, 5)); // D2
    assert_eq!(p.third_person, share(3, 5)); // D1, D2, D5: 60%
    assert_eq!(p.gendered, share(1, 5)); // D1
    assert_eq!(p.any, share(4, 5)); // all but D3: 80%
    assert_eq!(p.she.percent, 20.0);
}

#[test]
fn the_word_rule_on_unicode_text() {
    let docs = [
        "naïve—she’s café", // naïve, she, s, café (4): the dash and ’ separate; She
        "ΑΥΤΗ HER",         // αυτη, her (2): Greek lower-cased too; She
        "—",                // no word (0), still a document
        "x²",               // x² (1): ² is a digit (Numeric)
        "SHE\u{a0}HE",      // she, he (2): a no-break space separates; She, He
    ];
    let report = audit_documents(docs, &no_languages()).unwrap();
    assert_eq!((report.documents, report.words), (5, 4 + 2 + 1 + 2));
    assert_eq!(report.pronouns.she, share(3, 5));
    assert_eq!(report.pronouns.he, share(1, 5));
}

#[test]
fn descriptors_count_documents_per_axis_and_term() {
    let descriptors = Descriptors::parse(
        r#"{"Nationality": ["american", "mexican"],
            "Race and Ethnicity": ["native american", "asian"],
            "Religion": ["jewish"]}"#,
    )
    .unwrap();
    let options = Options { descriptors, ..no_languages() };
    let text = "An American, an AMERICAN and a Mexican.\n\n\
                Native\nAmerican poets\n\n\
                native-american and asian-american\n\n\
                Americans are not matched\n\n\
                jewish\n\n\
                native\n\n\
                ...\n";
    // A: an, american, an, american, and, a, mexican (7): Nationality once (american twice in
    //    one document counts one document), mexican.
    // B: native, american, poets (3): "native american" across the newline; leftmost-longest,
    //    so not also "american".
    // C: native, american, and, asian, american (5): "native american", then "asian", then the
    //    second "american" on its own (Nationality).
    // D: americans, are, not, matched (4): "americans" is not "american".
    // E: jewish (1). F: native (1): a multi-word term cut short by the document's end. G: no
    //    word (0), still a document.
    let report = audit_text(text, &options).unwrap();
    assert_eq!(report.documents, 7);
    assert_eq!(report.words, 7 + 3 + 5 + 4 + 1 + 1);
    let axes = &report.descriptors.0;
    let names: Vec<&str> = axes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Nationality", "Race and Ethnicity", "Religion"]);

    // Nationality: A, C = 2 of 7 documents; american in A and C (100% of 2), mexican in A (50%).
    let nationality = &axes[0].1;
    assert_eq!((nationality.documents, nationality.percent), (2, 200.0 / 7.0));
    let terms: Vec<(&str, u64, f64)> =
        nationality.terms.iter().map(|t| (t.term.as_str(), t.documents, t.percent_of_axis)).collect();
    assert_eq!(terms, [("american", 2, 100.0), ("mexican", 1, 50.0)]);

    // Race and Ethnicity: B, C = 2; native american in B and C (100%), asian in C (50%).
    let race = &axes[1].1;
    assert_eq!(race.documents, 2);
    let terms: Vec<(&str, u64, f64)> =
        race.terms.iter().map(|t| (t.term.as_str(), t.documents, t.percent_of_axis)).collect();
    assert_eq!(terms, [("native american", 2, 100.0), ("asian", 1, 50.0)]);

    // Religion: E = 1 of 7.
    let religion = &axes[2].1;
    assert_eq!((religion.documents, religion.percent), (1, 100.0 / 7.0));
    assert_eq!(religion.terms[0].documents, 1);
}

#[test]
fn terms_sort_by_count_then_name_and_all_reach_the_json() {
    let descriptors = Descriptors::parse(r#"{"X": ["zeta", "beta", "alpha", "unused"]}"#).unwrap();
    let options = Options { descriptors, ..no_languages() };
    // zeta in 2 documents, alpha and beta in 1 each, unused in none: zeta, alpha, beta, unused.
    let report = audit_documents(["zeta beta", "zeta alpha", "nothing"], &options).unwrap();
    let x = &report.descriptors.0[0].1;
    let order: Vec<&str> = x.terms.iter().map(|t| t.term.as_str()).collect();
    assert_eq!(order, ["zeta", "alpha", "beta", "unused"]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["descriptors"]["X"]["terms"].as_array().unwrap().len(), 4);
    assert_eq!(json["descriptors"]["X"]["documents"], 2);
    assert_eq!(json["pronouns"]["any"]["documents"], 0);
    for key in ["documents", "words", "bytes", "pronouns", "languages", "pii", "duplicates"] {
        assert!(json.get(key).is_some(), "{key}");
    }
}

#[test]
fn personal_data_and_duplicates() {
    let docs = [
        "mail a.b@example.org now",         // e-mail
        "call 555-123-4567 today",          // phone
        "host 10.0.0.1 up",                 // IPv4
        "version 1.2.3, 999.1.1.1 in 2024", // none: three numbers, 999 is no octet, a year
        "user@localhost",                   // none: no top-level domain
        "Same  text\nhere",                 // normalised "Same text here"
        "Same text here",                   // duplicate of the previous one
        " same text here",                  // trimmed, but the case differs: not a duplicate
    ];
    let report = audit_documents(docs, &no_languages()).unwrap();
    assert_eq!(report.documents, 8);
    assert_eq!(report.pii.email, share(1, 8));
    assert_eq!(report.pii.phone, share(1, 8));
    assert_eq!(report.pii.ipv4, share(1, 8));
    assert_eq!(report.pii.any, share(3, 8)); // 37.5%
    assert_eq!(report.duplicates, share(1, 8)); // 12.5%
    // Phone shapes: (555) 123-4567, +1 555 123 4567, +44 20 7946 0958; not 20240520 or 12-34.
    let phones = ["(555) 123-4567", "+1 555 123 4567", "+44 20 7946 0958", "20240520", "12-34"];
    let report = audit_documents(phones, &no_languages()).unwrap();
    assert_eq!(report.pii.phone.documents, 3);
}

#[test]
fn empty_documents_and_json_lines_without_the_field() {
    let jsonl = concat!(
        "{\"text\": \"She runs.\"}\n", // line 1: a document
        "{\"text\": \"\"}\n",          // line 2: empty
        "{\"text\": \"   \\n \"}\n",   // line 3: empty once trimmed
        "\n",                          // line 4: blank, ignored
        "{\"id\": 5}\n",               // line 5: no "text"
        "{\"meta\": {\"a\": [1, 2]}, \"text\": \"He \\u0072uns.\"}\n", // line 6: escaped text
        "not json\n",                  // line 7: not JSON
    );
    let inputs = [Input::memory("docs.jsonl", jsonl.as_bytes().to_vec(), Format::Jsonl)];
    let err = audit(&inputs, &no_languages(), &|_, _| {}).unwrap_err();
    // The first bad line is reported, whatever the threads did.
    assert!(matches!(&err, AuditError::MissingField { line: 5, field, .. } if field == "text"), "{err}");
    assert!(err.to_string().contains("docs.jsonl: line 5"), "{err}");

    // Under --skip-bad: lines 1 and 6 are documents (She, He: 50% each), 2 and 3 are empty,
    // 5 and 7 skipped.
    let options = Options { skip_bad: true, ..no_languages() };
    let report = audit(&inputs, &options, &|_, _| {}).unwrap();
    assert_eq!((report.documents, report.empty_documents, report.skipped), (2, 2, 2));
    assert_eq!(report.pronouns.she, share(1, 2));
    assert_eq!(report.pronouns.he, share(1, 2));
    // "she runs" + "he runs": 4 words; 9 + 8 bytes.
    assert_eq!((report.words, report.bytes), (4, 17));

    // Another field name.
    let inputs = [Input::memory("c.jsonl", b"{\"content\": \"we\"}\n".to_vec(), Format::Jsonl)];
    let options = Options { text_field: "content".into(), ..no_languages() };
    assert_eq!(audit(&inputs, &options, &|_, _| {}).unwrap().pronouns.first_person.documents, 1);
    let err = audit(&inputs, &no_languages(), &|_, _| {}).unwrap_err();
    assert!(matches!(err, AuditError::MissingField { line: 1, .. }), "{err}");
}

#[test]
fn invalid_utf8_names_file_line_and_offset() {
    // "ok doc\n\n" is 8 bytes and "bad " 4 more: the bad byte is at offset 12, on line 3.
    let bytes = b"ok doc\n\nbad \xff doc\nsecond line\n\nfine doc\n".to_vec();
    let inputs = [Input::memory("bad.txt", bytes.clone(), Format::Text)];
    let err = audit(&inputs, &no_languages(), &|_, _| {}).unwrap_err();
    assert!(matches!(err, AuditError::Utf8 { line: 3, offset: 12, .. }), "{err}");
    assert!(err.to_string().starts_with("bad.txt: line 3: invalid UTF-8 at byte offset 12"), "{err}");
    // Skipped: the two-line bad document; "ok doc" and "fine doc" remain.
    let options = Options { skip_bad: true, ..no_languages() };
    let report = audit(&inputs, &options, &|_, _| {}).unwrap();
    assert_eq!((report.documents, report.skipped, report.words), (2, 1, 4));

    // In JSON Lines the line is named too: line 2 starts at byte 14, its bad byte is 10 later.
    let jsonl = b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n".to_vec();
    let inputs = [Input::memory("bad.jsonl", jsonl, Format::Jsonl)];
    let err = audit(&inputs, &no_languages(), &|_, _| {}).unwrap_err();
    assert!(matches!(err, AuditError::Utf8 { line: 2, offset: 24, .. }), "{err}");
}

/// A small corpus touching every counter: pronouns, descriptors (one multi-word across a
/// newline), personal data, a duplicate, non-ASCII text, an English and a French document.
const CORPUS: &str = "She told her Mexican friends that they would come.\n\n\
The native\nAmerican museum and the Catholic church are open.\n\n\
Écrivez-nous à contact@example.fr : nous répondrons à vos questions très rapidement.\n\n\
Call 555-123-4567 or visit 192.168.0.1 if you need us.\n\n\
She told her Mexican friends that they would come.\n\n\
Ünïcödé wörds: İstanbul, straße, ΑΘΗΝΑ.\n";

#[test]
fn the_three_formats_give_the_same_counts() {
    let tokenizer = TextTokenizer::bytes();
    let options = Options { tokenizer: Some(tokenizer.clone()), ..Options::default() };
    let docs = documents(CORPUS);
    assert_eq!(docs.len(), 6);

    let text = Input::memory("c.txt", CORPUS.as_bytes().to_vec(), Format::Text);
    let jsonl: String =
        docs.iter().map(|d| format!("{}\n", serde_json::json!({"id": 1, "text": d}))).collect();
    let jsonl = Input::memory("c.jsonl", jsonl.into_bytes(), Format::Jsonl);
    // The trainer's token files: each document's encoding (<s> first), concatenated.
    let ids: Vec<u16> =
        tokenizer.encode_all(docs.clone(), true).unwrap().concat().iter().map(|&t| t as u16).collect();
    let tokens = Input::memory("c.bin", encode_llmc_u16(&ids), Format::Tokens);

    let reports: Vec<serde_json::Value> = [text, jsonl, tokens]
        .into_iter()
        .map(|input| serde_json::to_value(audit(&[input], &options, &|_, _| {}).unwrap()).unwrap())
        .collect();
    assert_eq!(reports[0], reports[1], "text vs JSON Lines");
    assert_eq!(reports[0], reports[2], "text vs tokens");
    // Byte tokens: one per byte plus <s> per document.
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    assert_eq!(reports[0]["tokens"], (bytes + docs.len()) as u64);
    assert_eq!(reports[0]["bytes"], bytes as u64);
    assert_eq!(reports[0]["duplicates"]["documents"], 1);
}

#[test]
fn chunks_and_threads_do_not_change_the_counts() {
    // The newline keeps the last document of one copy apart from the first of the next.
    let corpus = format!("{CORPUS}\n").repeat(7);
    let whole = audit_text(&corpus, &Options::default()).unwrap();
    for chunk_bytes in [1, 50, 333] {
        for threads in [1, 3] {
            let options = Options { chunk_bytes, threads: Some(threads), ..Options::default() };
            assert_eq!(
                audit_text(&corpus, &options).unwrap(),
                whole,
                "{chunk_bytes} bytes, {threads} threads"
            );
        }
    }
    // 6 documents × 7, of which 5 distinct ones: 37 duplicates.
    assert_eq!(whole.documents, 42);
    assert_eq!(whole.duplicates.documents, 42 - 5);
    // Several files are one corpus.
    let a = Input::memory("a.txt", CORPUS.as_bytes().to_vec(), Format::Text);
    let two = audit(&[a.clone(), a], &Options::default(), &|_, _| {}).unwrap();
    assert_eq!((two.documents, two.duplicates.documents), (12, 7));
}

#[test]
fn languages_by_whatlang_with_a_threshold() {
    let docs = [
        "She told her friends that they would come to the house tomorrow evening for dinner.",
        "Le renard brun saute par-dessus le chien paresseux pendant que les enfants jouent.",
        "12345 67890", // no letters: whatlang has no guess, so unknown
        "",            // empty: not a document, so not examined
    ];
    let report = audit_documents(docs, &Options::default()).unwrap();
    let l = &report.languages;
    assert_eq!((l.examined, l.every), (3, 1));
    let found: Vec<(&str, u64)> = l.detected.iter().map(|x| (x.code.as_str(), x.documents)).collect();
    assert!(found.contains(&("eng", 1)) && found.contains(&("fra", 1)), "{found:?}");
    assert_eq!(l.unknown, share(1, 3));
    // A threshold is a confidence (0–1); --lang-every 0 examines nothing.
    let bad = Options { lang_threshold: 1.5, ..Options::default() };
    assert!(matches!(audit_documents(docs, &bad), Err(AuditError::Options(_))));
    let none = audit_documents(docs, &no_languages()).unwrap();
    assert_eq!((none.languages.examined, none.languages.detected.len()), (0, 0));
}

#[test]
fn token_files_need_a_tokenizer_with_bos() {
    let input = Input::memory("c.bin", encode_llmc_u16(&[256, 104, 105]), Format::Tokens);
    let err = audit(std::slice::from_ref(&input), &no_languages(), &|_, _| {}).unwrap_err();
    assert!(err.to_string().contains("needs --tokenizer"), "{err}");
    let options = Options { tokenizer: Some(TextTokenizer::bytes()), ..no_languages() };
    // <s> "hi": one document, two bytes, 3 tokens.
    let report = audit(&[input], &options, &|_, _| {}).unwrap();
    assert_eq!((report.documents, report.bytes, report.tokens), (1, 2, Some(3)));
    // <s><s> "hi": an empty document first.
    let input = Input::memory("d.bin", encode_llmc_u16(&[256, 256, 104, 105]), Format::Tokens);
    let report = audit(&[input], &options, &|_, _| {}).unwrap();
    assert_eq!((report.documents, report.empty_documents), (1, 1));
}
