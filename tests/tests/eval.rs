//! Token files and evaluation: formats, batch slicing, errors, and the eval loss against the
//! f64 reference model on the same batches.

use dsl::{BackendRuntime, Device};
use model::reference::loss_and_grads;
use model::{Llama, Params};
use std::path::Path;
use tests::models::{self, random_params, to_f32, to_f64};
use tests::*;
use trainer::data::{DetectedFormat, TokenFormat, TokenStream, encode_llmc_u16, encode_llmc_u32};
use trainer::eval::evaluate;

fn llama2c_bytes(tokens: &[u16]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

#[test]
fn the_three_formats_decode_to_the_same_stream() {
    let tokens: Vec<u16> = (0..1000).map(|i| (i * 37 % 500) as u16).collect();
    let wide: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let path = Path::new("mem.bin");
    for (bytes, format, detected) in [
        (encode_llmc_u16(&tokens), TokenFormat::Auto, DetectedFormat::LlmcU16),
        (encode_llmc_u16(&tokens), TokenFormat::Llmc, DetectedFormat::LlmcU16),
        (encode_llmc_u32(&wide), TokenFormat::Auto, DetectedFormat::LlmcU32),
        (llama2c_bytes(&tokens), TokenFormat::Auto, DetectedFormat::Llama2c),
        (llama2c_bytes(&tokens), TokenFormat::Llama2c, DetectedFormat::Llama2c),
    ] {
        let stream = TokenStream::decode(path, &bytes, format).unwrap();
        assert_eq!(stream.format, detected);
        assert_eq!(stream.to_vec(), wide, "{detected}");
    }
}

#[test]
fn batches_are_windows_shifted_by_one() {
    let tokens: Vec<u16> = (0..23).collect();
    let stream =
        TokenStream::decode(Path::new("t.bin"), &llama2c_bytes(&tokens), TokenFormat::Llama2c).unwrap();
    // B·T = 6: 22 usable transitions → 3 whole batches.
    assert_eq!(stream.batches(2, 3), 3);
    let (inputs, targets) = stream.batch(1, 2, 3, 100).unwrap();
    assert_eq!(inputs, [6, 7, 8, 9, 10, 11]);
    assert_eq!(targets, [7, 8, 9, 10, 11, 12]);
    assert_eq!(stream.plan(2, 3, None).unwrap(), 3);
    assert_eq!(stream.plan(2, 3, Some(2)).unwrap(), 2);
    let err = stream.plan(2, 3, Some(4)).unwrap_err().to_string();
    assert!(err.contains("t.bin") && err.contains("asked for 4 batches") && err.contains("holds 3"), "{err}");
    let err = stream.plan(4, 8, None).unwrap_err().to_string();
    assert!(err.contains("t.bin") && err.contains("23 tokens are fewer than one batch needs (33"), "{err}");
}

#[test]
fn bad_token_files_get_errors_naming_the_file() {
    let path = Path::new("data/shard_000.bin");
    let expect = |bytes: &[u8], format: TokenFormat, needles: &[&str]| {
        let err = TokenStream::decode(path, bytes, format).err().expect("must fail").to_string();
        assert!(err.contains("data/shard_000.bin"), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "`{err}` should mention `{needle}`");
        }
    };
    let tokens: Vec<u16> = (0..64).collect();
    let mut wrong_magic = encode_llmc_u16(&tokens);
    wrong_magic[0..4].copy_from_slice(&20240521i32.to_le_bytes());
    expect(&wrong_magic, TokenFormat::Auto, &["magic 20240521", "expected 20240520 or 20240801"]);
    expect(&wrong_magic, TokenFormat::Llmc, &["wrong magic 20240521"]);
    let mut wrong_version = encode_llmc_u16(&tokens);
    wrong_version[4..8].copy_from_slice(&3i32.to_le_bytes());
    expect(&wrong_version, TokenFormat::Auto, &["version 3"]);
    let truncated = &encode_llmc_u16(&tokens)[..1024 + 100];
    expect(truncated, TokenFormat::Auto, &["header says 64 tokens (128 bytes) but 100 bytes follow"]);
    expect(&[1, 2, 3], TokenFormat::Llama2c, &["3 bytes is not a whole number of uint16 tokens"]);
    expect(&[0; 10], TokenFormat::Llmc, &["shorter than an llm.c header"]);

    let stream =
        TokenStream::decode(path, &llama2c_bytes(&[1, 2, 3, 700, 4, 5, 6]), TokenFormat::Auto).unwrap();
    let err = stream.batch(0, 1, 6, 512).unwrap_err().to_string();
    assert!(err.contains("token id 700 at position 3") && err.contains("vocabulary of 512"), "{err}");
}

fn eval_matches_reference<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(53, 32, 48, 2, 4, 2, 16);
    let host = to_f32(&random_params(&config, 21));
    let model =
        Llama::new(dev, config.clone(), Params::<R, f32>::from_host(dev, &config, &host).unwrap()).unwrap();
    let mut rng = DataRng::new(4);
    let tokens: Vec<u16> = (0..100).map(|_| (rng.next_u64() % 53) as u16).collect();
    let stream =
        TokenStream::decode(Path::new("eval.bin"), &encode_llmc_u16(&tokens), TokenFormat::Auto).unwrap();
    let (batch, seq) = (2, 7);
    let mut seen = Vec::new();
    let report =
        evaluate(dev, &model, &stream, batch, seq, None, |done, total, _| seen.push((done, total))).unwrap();
    // 99 transitions / 14 per batch = 7 batches.
    assert_eq!((report.batches, report.tokens), (7, 7 * 14));
    assert_eq!(seen.last(), Some(&(7, 7)));
    let params = to_f64(&host);
    let want: f64 = (0..7)
        .map(|k| {
            let (inputs, targets) = stream.batch(k, batch, seq, 53).unwrap();
            loss_and_grads(&config, &params, &inputs, &targets, batch, seq).loss
        })
        .sum::<f64>()
        / 7.0;
    assert!((report.loss - want).abs() <= 1e-5 * want, "eval loss {} vs reference {want}", report.loss);
    assert!((report.perplexity - want.exp()).abs() <= 1e-4 * want.exp());

    let bad =
        TokenStream::decode(Path::new("bad.bin"), &encode_llmc_u16(&[1, 2, 3, 60, 4]), TokenFormat::Auto)
            .unwrap();
    let err = evaluate(dev, &model, &bad, 1, 4, None, |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("bad.bin") && err.contains("token id 60 at position 3"), "{err}");
}

#[test]
fn eval_loss_is_the_reference_models_mean_over_batches() {
    on_test_backend!(eval_matches_reference);
}
