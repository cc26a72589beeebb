//! The built-in corpus of the default training run: English-like sentences generated from a
//! small grammar by a seeded generator (no download, identical on every machine), in paragraphs
//! of four sentences separated by blank lines, tokenised by the byte tokenizer
//! ([`TextTokenizer::bytes`]: ids 0–255 are the bytes, each paragraph starts with `<s>` = 256).
//!
//! It has structure at every scale a small model can learn in minutes: spelling of a few dozen
//! words, agreement (`a cat sees` / `the cats see`), and sentence shape.

use crate::data::{DetectedFormat, TokenStream, documents};
use crate::tokenizer::TextTokenizer;
use model::init::SplitMix64;

/// How the built-in corpus is named in output and checkpoints.
pub const NAME: &str = "built-in corpus (generated sentences, byte tokens)";

/// The corpus's word choices.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[(self.next() % words.len() as u64) as usize]
    }
}

const NOUNS: [&str; 12] =
    ["cat", "dog", "bird", "fox", "child", "farmer", "teacher", "river", "tree", "robot", "king", "queen"];
const ADJECTIVES: [&str; 10] =
    ["small", "old", "happy", "quiet", "brave", "green", "tired", "clever", "tall", "kind"];
const VERBS: [(&str, &str); 8] = [
    ("sees", "see"),
    ("likes", "like"),
    ("follows", "follow"),
    ("helps", "help"),
    ("finds", "find"),
    ("watches", "watch"),
    ("calls", "call"),
    ("knows", "know"),
];
const PLACES: [&str; 6] =
    ["in the garden", "near the river", "at night", "in the morning", "by the sea", "on the hill"];

fn noun_phrase(rng: &mut Rng, plural: bool) -> String {
    let noun = rng.pick(&NOUNS);
    let noun = if plural {
        match noun {
            "child" => "children".to_string(),
            "fox" => "foxes".to_string(),
            n => format!("{n}s"),
        }
    } else {
        noun.to_string()
    };
    let article = if plural || rng.next().is_multiple_of(2) { "the" } else { "a" };
    if rng.next().is_multiple_of(2) {
        format!("{article} {} {noun}", rng.pick(&ADJECTIVES))
    } else {
        format!("{article} {noun}")
    }
}

fn sentence(rng: &mut Rng) -> String {
    let plural = rng.next().is_multiple_of(3);
    let subject = noun_phrase(rng, plural);
    let (singular_verb, plural_verb) = VERBS[(rng.next() % VERBS.len() as u64) as usize];
    let plural_object = rng.next().is_multiple_of(4);
    let object = noun_phrase(rng, plural_object);
    let mut s = format!("{subject} {} {object}", if plural { plural_verb } else { singular_verb });
    if rng.next().is_multiple_of(3) {
        s.push(' ');
        s.push_str(rng.pick(&PLACES));
    }
    let mut chars = s.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or(' ');
    format!("{first}{}.", chars.as_str())
}

/// About `bytes` bytes of text: sentences separated by spaces, paragraphs by blank lines.
pub fn text(bytes: usize, seed: u64) -> String {
    let mut rng = Rng(SplitMix64(seed ^ 0xC0_2B_05));
    let mut out = String::with_capacity(bytes + 128);
    let mut in_paragraph = 0;
    while out.len() < bytes {
        out.push_str(&sentence(&mut rng));
        in_paragraph += 1;
        if in_paragraph == 4 {
            out.push_str("\n\n");
            in_paragraph = 0;
        } else {
            out.push(' ');
        }
    }
    out
}

/// The default run's data: about `bytes` bytes of [`text`] through the byte tokenizer, and
/// that tokenizer.
pub fn stream(bytes: usize, seed: u64) -> crate::Result<(TokenStream, TextTokenizer)> {
    let tokenizer = TextTokenizer::bytes();
    let text = text(bytes, seed);
    let tokens = tokenizer.encode_all(documents(&text), true)?.concat();
    let stream = TokenStream::from_tokens(NAME, DetectedFormat::Text, tokens);
    Ok((stream, tokenizer))
}
