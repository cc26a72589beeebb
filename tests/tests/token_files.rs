//! Data at corpus scale: several shards named by a glob are one stream equal to their
//! concatenation, a multi-GB token file is mapped without growing host memory, and text is
//! encoded once and then read from its token cache.

use std::path::PathBuf;
use trainer::data::{CacheOutcome, DocSeparator, TokenFormat, TokenStream, documents_by, encode_llmc_u16};
use trainer::source;
use trainer::tokenizer::TextTokenizer;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_three_shard_glob_reads_as_the_concatenated_file() {
    let dir = scratch("shards");
    let tokens: Vec<u16> = (0..1000u32).map(|i| (i * 31 % 997) as u16).collect();
    // Uneven shards, written out of order: the glob's sorted order is the stream's order.
    let cuts = [0, 333, 334, 1000];
    for (i, pair) in cuts.windows(2).enumerate().rev() {
        std::fs::write(dir.join(format!("train_{i:03}.bin")), encode_llmc_u16(&tokens[pair[0]..pair[1]]))
            .unwrap();
    }
    std::fs::write(dir.join("whole.bin"), encode_llmc_u16(&tokens)).unwrap();
    let files = source::expand(&[dir.join("train_*.bin")]).unwrap();
    assert_eq!(files.len(), 3);
    let shards = TokenStream::open_many(&files, TokenFormat::Auto).unwrap();
    let whole = TokenStream::open(&dir.join("whole.bin"), TokenFormat::Auto).unwrap();
    assert_eq!(shards.len(), whole.len());
    assert_eq!(shards.to_vec(), whole.to_vec());
    // Batches of 2 × 37 cross both shard boundaries (333 and 334) in the first five.
    let (b, t) = (2, 37);
    assert_eq!(shards.batches(b, t), whole.batches(b, t));
    for k in 0..shards.batches(b, t) {
        assert_eq!(shards.batch(k, b, t, 1000).unwrap(), whole.batch(k, b, t, 1000).unwrap(), "batch {k}");
    }
    // An id past the vocabulary names the shard that holds it and the position there. Batch 4
    // reads tokens [296, 371), across both boundaries; its largest id is made the first
    // outside a vocabulary of that size.
    let window = 4 * b * t..5 * b * t + 1;
    let vocab = *tokens[window.clone()].iter().max().unwrap() as usize;
    let err = shards.batch(4, b, t, vocab).unwrap_err().to_string();
    let in_batch_4 = window.clone().find(|&p| tokens[p] as usize >= vocab).unwrap();
    let (shard, position) = if in_batch_4 < 333 {
        ("train_000.bin", in_batch_4)
    } else if in_batch_4 < 334 {
        ("train_001.bin", in_batch_4 - 333)
    } else {
        ("train_002.bin", in_batch_4 - 334)
    };
    assert!(err.contains(shard) && err.contains(&format!("at position {position} ")), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Resident memory of this process in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_four_gib_token_file_is_mapped_not_read() {
    let dir = scratch("big");
    let file = dir.join("big.bin");
    // A sparse llama2.c file: 2^31 tokens (4 GiB) that occupy no disk, all id 0.
    let bytes = 4u64 << 30;
    std::fs::File::create(&file).unwrap().set_len(bytes).unwrap();
    let before = rss_kib();
    let stream = TokenStream::open(&file, TokenFormat::Llama2c).unwrap();
    assert_eq!(stream.len() as u64, bytes / 2);
    assert!(!stream.in_memory());
    let (b, t) = (4, 1024);
    let last = stream.batches(b, t) - 1;
    for k in [0, last / 2, last] {
        let (inputs, targets) = stream.batch(k, b, t, 32000).unwrap();
        assert!(inputs.iter().all(|&x| x == 0) && targets.iter().all(|&x| x == 0));
    }
    let (train, val) = trainer::train::split(&stream, 0.01, b, t).unwrap();
    assert_eq!(train.len() + val.unwrap().len(), stream.len());
    if let (Some(before), Some(after)) = (before, rss_kib()) {
        // Reading the whole file would add 4 GiB; three batches touch a few pages.
        let grown = after.saturating_sub(before);
        eprintln!("resident memory grew by {grown} KiB for a {bytes}-byte file");
        assert!(grown < 64 * 1024, "resident memory grew by {grown} KiB");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn text_is_encoded_once_then_read_from_its_cache() {
    let dir = scratch("cache");
    let text = dir.join("fortunes.txt");
    // Fortune-file style: documents end at '%' lines; blank lines stay inside a document.
    std::fs::write(&text, "ab\n\ncd\n%\nef\n%\n%\n  gh  \n").unwrap();
    let separator = DocSeparator::from_option(Some("%"));
    let docs: Vec<&str> = documents_by("ab\n\ncd\n%\nef\n%\n%\n  gh  \n", &separator).collect();
    assert_eq!(docs, ["ab\n\ncd", "ef", "gh"]);
    let bytes = TextTokenizer::bytes();
    // The byte tokenizer: <s> = 256, then the UTF-8 bytes of each document.
    let want: Vec<u32> = [256, 97, 98, 10, 10, 99, 100, 256, 101, 102, 256, 103, 104].to_vec();
    let files = [text.clone()];
    let (first, outcomes) = TokenStream::open_text_files(&files, &bytes, &separator).unwrap();
    assert_eq!(first.to_vec(), want);
    let CacheOutcome::Written { cache } = &outcomes[0] else { panic!("{:?}", outcomes[0]) };
    assert!(cache.file_name().unwrap().to_str().unwrap().starts_with("fortunes.txt.tokens-"));
    let (second, outcomes) = TokenStream::open_text_files(&files, &bytes, &separator).unwrap();
    assert!(matches!(&outcomes[0], CacheOutcome::Hit { cache: hit } if hit == cache), "{:?}", outcomes[0]);
    assert_eq!(second.to_vec(), want);
    assert!(!second.in_memory(), "a cache hit maps the cached tokens");
    // Another separator (or tokenizer, or text) is another key: encoded anew.
    let (blank, outcomes) = TokenStream::open_text_files(&files, &bytes, &DocSeparator::BlankLine).unwrap();
    assert!(matches!(outcomes[0], CacheOutcome::Written { .. }), "{:?}", outcomes[0]);
    assert_eq!(blank.to_vec()[..3], [256, 97, 98]);
    assert_eq!(blank.to_vec().iter().filter(|&&x| x == 256).count(), 2, "ab | cd\\n%\\nef\\n%\\n%\\n  gh");
    std::fs::write(&text, "ab\n%\n").unwrap();
    let (changed, outcomes) = TokenStream::open_text_files(&files, &bytes, &separator).unwrap();
    assert!(matches!(outcomes[0], CacheOutcome::Written { .. }));
    assert_eq!(changed.to_vec(), [256, 97, 98]);
    std::fs::remove_dir_all(dir).unwrap();
}
