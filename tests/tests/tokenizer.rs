//! Tokenizers: the byte tokenizer of the built-in corpus, BPE trained on text, a tokenizer.json
//! built like Llama 2's (the components its file uses), text data files, and their errors.
//! Host-only: no device.

use std::path::{Path, PathBuf};
use trainer::data::{DetectedFormat, TokenFormat, TokenStream, documents};
use trainer::tokenizer::TextTokenizer;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_byte_tokenizer_maps_bytes_to_their_values() {
    let t = TextTokenizer::bytes();
    let text = "Héllo, wörld!\n\t\u{1F600} ~";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(t.encode("ab", true).unwrap(), vec![256, 97, 98], "<s> = 256 first");
    assert_eq!((t.bos(), t.eos(), t.vocab_size()), (Some(256), Some(257), 258));
    assert_eq!(t.decode(&ids, true).unwrap(), text);
    // Every ASCII byte, including the ones GPT-2's map moves (space, controls, 0x7F), and the
    // bytes of characters up to U+07FF (0x80–0xDF: continuation and lead bytes).
    let ascii: String = (0..128u8).map(char::from).collect();
    assert_eq!(t.decode(&(0..128).collect::<Vec<_>>(), true).unwrap(), ascii);
    let two_byte: String = (0x80..0x800u32).filter_map(char::from_u32).collect();
    let ids = t.encode(&two_byte, false).unwrap();
    assert_eq!(ids, two_byte.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(t.decode(&ids, true).unwrap(), two_byte);
    // Streaming prints a multi-byte character only once it is whole.
    let mut stream = t.stream_decoder();
    let pieces: Vec<String> = "é!".bytes().map(|b| stream.push(u32::from(b)).unwrap()).collect();
    assert_eq!(pieces, ["", "é", "!"]);
}

#[test]
fn a_trained_bpe_compresses_and_round_trips() {
    let text = trainer::corpus::text(30_000, 3);
    let t = TextTokenizer::train_bpe(documents(&text).into_iter(), 320).unwrap();
    assert_eq!(t.vocab_size(), 320);
    let unseen = "The brave robots find a quiet queen by the sea. Zebras ünd 42!";
    let ids = t.encode(unseen, true).unwrap();
    assert_eq!(Some(ids[0]), t.bos());
    // 62 merges learned from the corpus's words: ~0.6 tokens per byte on its vocabulary.
    assert!(ids.len() < unseen.len() * 3 / 4, "{} tokens for {} bytes", ids.len(), unseen.len());
    assert!(ids.iter().all(|&id| (id as usize) < 320));
    assert_eq!(t.decode(&ids, true).unwrap(), unseen);
    // Saved and loaded, it encodes the same.
    let dir = scratch("bpe");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, t.to_json().unwrap()).unwrap();
    let loaded = TextTokenizer::load(&path).unwrap();
    assert_eq!(loaded.encode(unseen, true).unwrap(), ids);
    assert!(TextTokenizer::train_bpe(documents(&text).into_iter(), 100).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A tokenizer.json with the structure of Llama 2's (`meta-llama/Llama-2-7b-hf`): SentencePiece
/// BPE with byte fallback, `▁` for spaces prepended by the normalizer, no pre-tokenizer, `<s>`
/// added by a template, and the decoder chain that undoes it. The vocabulary is cut down to a
/// few pieces; ids 0–2 and the 256 byte tokens at 3–258 are where Llama 2 has them.
fn llama2_style_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, piece) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(piece.to_string(), i.into());
    }
    for b in 0..256u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor",
        "▁world", "ld",
    ];
    for (i, piece) in pieces.iter().enumerate() {
        vocab.insert(piece.to_string(), (259 + i as u32).into());
    }
    let merges = ["h e", "l l", "ll o", "he llo", "▁ hello", "▁ w", "o r", "▁w or", "l d", "▁wor ld"];
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
    .to_string()
}

#[test]
fn a_llama2_style_tokenizer_json_works() {
    let dir = scratch("llama2");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, llama2_style_json()).unwrap();
    let t = TextTokenizer::load(&path).unwrap();
    assert_eq!((t.bos(), t.eos()), (Some(1), Some(2)));
    let id = |piece: &str| t.token_to_id(piece).unwrap();
    // "hello world" → <s> ▁hello ▁world, as Llama 2's tokenizer splits it.
    let ids = t.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, id("▁hello"), id("▁world")]);
    // A character outside the vocabulary falls back to its UTF-8 bytes: é = <0xC3> <0xA9>.
    let ids = t.encode("hé", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("h"), 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(t.decode(&ids, true).unwrap(), "hé");
    assert_eq!(t.decode(&t.encode("hello world", true).unwrap(), true).unwrap(), "hello world");
    // Adding a special token appends it after the vocabulary.
    let mut grown = t.clone();
    let sep = grown.add_special("<|response|>");
    assert_eq!((sep as usize, grown.vocab_size()), (t.vocab_size(), t.vocab_size() + 1));
    assert_eq!(grown.encode("hello<|response|>world", false).unwrap()[1], sep);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn text_files_become_documents_that_start_with_bos() {
    assert_eq!(documents("a b\nc\n\n\n  d  \n \ne"), vec!["a b\nc", "d", "e"]);
    assert!(documents("\n \n").is_empty());
    let dir = scratch("text");
    let path = dir.join("data.txt");
    std::fs::write(&path, "ab\n\ncd").unwrap();
    assert!(TokenFormat::Auto.is_text(&path) && !TokenFormat::Auto.is_text(Path::new("x.bin")));
    let stream = TokenStream::open_text(&path, &TextTokenizer::bytes()).unwrap();
    assert_eq!(stream.to_vec(), vec![256, 97, 98, 256, 99, 100]);
    assert_eq!(stream.format, DetectedFormat::Text);
    std::fs::write(&path, b"ok\xff\xfe").unwrap();
    let err = TokenStream::open_text(&path, &TextTokenizer::bytes()).err().unwrap().to_string();
    assert!(err.contains("data.txt") && err.contains("not UTF-8") && err.contains("offset 2"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_tokenizers_are_clear_errors() {
    let dir = scratch("bad");
    let missing = dir.join("absent.json");
    let err = TextTokenizer::load(&missing).err().unwrap().to_string();
    assert!(err.contains("absent.json") && err.contains("cannot read"), "{err}");
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"model\": 3}").unwrap();
    let err = TextTokenizer::load(&garbage).err().unwrap().to_string();
    assert!(err.contains("garbage.json") && err.contains("not a Hugging Face tokenizer.json"), "{err}");
    let err = TextTokenizer::bytes().check_fits(200, "the model").err().unwrap().to_string();
    assert!(err.contains("258 tokens") && err.contains("vocabulary of 200"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// User text is text: a literal `</s>` (or `<s>`) inside it encodes as the ordinary pieces of
/// those characters, as Llama 2's SentencePiece does, unless special-token parsing is asked for.
#[test]
fn special_token_text_in_user_text_is_text_unless_parsing_is_asked_for() {
    let t = TextTokenizer::bytes();
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    let text = "a</s>b<s>";
    assert_eq!(t.encode_text(text, false, false).unwrap(), bytes(text));
    assert_eq!(
        t.encode_text(text, true, false).unwrap(),
        [vec![256], bytes(text)].concat(),
        "<s> by the format"
    );
    assert_eq!(t.encode_text(text, false, true).unwrap(), vec![97, 257, 98, 256]);
    assert_eq!(
        t.encode_all_text(vec![text, "</s>"], false, false).unwrap(),
        vec![bytes(text), bytes("</s>")]
    );
    assert_eq!(
        t.encode_all_text(vec![text, "</s>"], false, true).unwrap(),
        vec![vec![97, 257, 98, 256], vec![257]]
    );

    // Llama 2's structure: `</s>` typed in the text is byte-fallback pieces <0x3C> <0x2F> <0x73>
    // <0x3E> (none of `<`, `/`, `s`, `>` is in this cut-down vocabulary), never id 2.
    let dir = scratch("literal");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, llama2_style_json()).unwrap();
    let t = TextTokenizer::load(&path).unwrap();
    let id = |piece: &str| t.token_to_id(piece).unwrap();
    let literal = t.encode_text("hello</s>world", true, false).unwrap();
    let byte = |c: char| 3 + c as u32;
    assert_eq!(
        literal,
        vec![1, id("▁hello"), byte('<'), byte('/'), byte('s'), byte('>'), id("w"), id("or"), id("ld")]
    );
    assert_eq!(t.decode(&literal, true).unwrap(), "hello</s>world");
    let parsed = t.encode_text("hello</s>world", true, true).unwrap();
    assert_eq!(&parsed[..3], &[1, id("▁hello"), 2], "parsed, </s> is the end-of-sequence id");
    // Loading, saving and growing the tokenizer leave the default (parsing) `encode` as it was.
    assert_eq!(t.encode("hello</s>world", true).unwrap(), parsed);
    std::fs::remove_dir_all(dir).unwrap();
}
