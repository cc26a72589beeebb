//! What a pretraining run reads: the `--data` files (globs; token files, memory-mapped, or text
//! through a tokenizer with its token cache), the validation data (`--val-data`, or a held-out
//! fraction, only when the run evaluates), recorded in the checkpoint and checked again on
//! `--resume`.

use crate::train::TrainArgs;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Instant;
use trainer::corpus;
use trainer::data::{DocSeparator, TokenFormat, TokenStream, documents_by, read_text};
use trainer::source::{self, DataSource, HeldOut};
use trainer::tokenizer::TextTokenizer;
use trainer::train::{TrainOptions, TrainState, Validation, split};

/// The built-in corpus of the default run: bytes of generated text, and its seed.
const BUILTIN_BYTES: usize = 400_000;
const BUILTIN_SEED: u64 = 0;

/// The data of a pretraining run.
pub struct RunData {
    pub train: TokenStream,
    pub val: Option<TokenStream>,
    /// Saved with the run: given, from the checkpoint, trained on the text, or the built-in
    /// corpus's byte tokenizer.
    pub tokenizer: Option<TextTokenizer>,
    pub source: DataSource,
    pub validation: Validation,
}

/// The `--data-format` name recorded for a format.
fn format_name(format: TokenFormat) -> &'static str {
    match format {
        TokenFormat::Auto => "auto",
        TokenFormat::Llmc => "llmc",
        TokenFormat::Llama2c => "llama2c",
        TokenFormat::Text => "text",
    }
}

/// The record of the files `patterns` name, read as `format`.
fn record_files(patterns: &[PathBuf], format: TokenFormat, separator: Option<&str>) -> Result<DataSource> {
    let paths = source::expand(patterns)?;
    fingerprint(&paths, format_name(format), separator)
}

fn fingerprint(paths: &[PathBuf], format: &str, separator: Option<&str>) -> Result<DataSource> {
    let started = Instant::now();
    let files = source::fingerprint(paths)?;
    let bytes: u64 = files.iter().map(|f| f.bytes).sum();
    if bytes > 1 << 30 {
        eprintln!(
            "fingerprinted {} file(s), {:.1} GiB, in {:.1} s",
            files.len(),
            bytes as f64 / (1u64 << 30) as f64,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(DataSource::Files { format: format.into(), doc_separator: separator.map(str::to_string), files })
}

/// The stream a recorded source names. Text is encoded with `tokenizer`, or, when there is
/// none, with a byte-level BPE of `vocab_size` tokens trained on it, returned as the second
/// value (the built-in corpus returns its byte tokenizer there too).
fn open_source(
    source: &DataSource,
    tokenizer: Option<&TextTokenizer>,
    vocab_size: usize,
) -> Result<(TokenStream, Option<TextTokenizer>)> {
    let DataSource::Files { format, doc_separator, files } = source else {
        let (stream, tokenizer) = corpus::stream(BUILTIN_BYTES, BUILTIN_SEED)?;
        return Ok((stream, Some(tokenizer)));
    };
    let format: TokenFormat = format.parse().map_err(anyhow::Error::msg)?;
    let paths: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
    let texts = paths.iter().filter(|p| format.is_text(p)).count();
    if texts == 0 {
        return Ok((TokenStream::open_many(&paths, format)?, None));
    }
    if texts != paths.len() {
        bail!(
            "--data mixes text and token files ({texts} of {} are text by their extension); pass \
             --data-format to read them all one way",
            paths.len()
        );
    }
    let separator = DocSeparator::from_option(doc_separator.as_deref());
    let trained = match tokenizer {
        Some(_) => None,
        None => {
            eprintln!("training a byte-level BPE tokenizer of {vocab_size} tokens on the text");
            let texts = paths.iter().map(|p| read_text(p)).collect::<Result<Vec<_>, _>>()?;
            let docs = texts.iter().flat_map(|t| documents_by(t, &separator));
            Some(TextTokenizer::train_bpe(docs, vocab_size)?)
        }
    };
    let encoder = tokenizer.or(trained.as_ref()).expect("given or trained");
    let (stream, outcomes) = TokenStream::open_text_files(&paths, encoder, &separator)?;
    for (path, outcome) in paths.iter().zip(outcomes) {
        eprintln!("{}: {outcome}", path.display());
    }
    Ok((stream, trained))
}

/// The training data and the validation data of `args`, fresh (`saved` = `None`) or resumed
/// from `saved`, with the final `options` (for the held-out batch size). `vocab_size`: of a BPE
/// trained on text data when no tokenizer is given.
pub fn pretraining_data(
    args: &TrainArgs,
    saved: Option<&TrainState>,
    options: &TrainOptions,
    tokenizer: Option<&TextTokenizer>,
    vocab_size: usize,
) -> Result<RunData> {
    let given_format = args.data_format;
    let source = match saved {
        None if args.data.is_empty() => DataSource::Builtin { bytes: BUILTIN_BYTES, seed: BUILTIN_SEED },
        None => record_files(
            &args.data,
            given_format.unwrap_or(TokenFormat::Auto),
            args.doc_separator.as_deref(),
        )?,
        Some(state) => resumed_source(args, state)?,
    };
    let (train, trained) = open_source(&source, tokenizer, vocab_size)?;
    let tokenizer = tokenizer.cloned().or(trained);
    let validation = match saved {
        None => fresh_validation(args)?,
        Some(state) => resumed_validation(args, state)?,
    };
    let (train, val) = match &validation.held_out {
        HeldOut::None => (train, None),
        HeldOut::Fraction { fraction } => split(&train, *fraction, options.batch, options.seq_len)?,
        HeldOut::Files { source } => {
            let (val, _) = open_source(source, tokenizer.as_ref(), vocab_size)?;
            (train, Some(val))
        }
    };
    eprintln!("data: {} — {} tokens ({})", source.describe(), train.len(), train.format);
    match (&validation.held_out, &val) {
        (HeldOut::None, _) => eprintln!(
            "validation: none — every token trains (--eval-every N holds out the last --val-fraction, \
             or evaluates on --val-data)"
        ),
        (HeldOut::Fraction { fraction }, Some(val)) => eprintln!(
            "validation: the last {val_tokens} tokens ({:.3}% of the data, --val-fraction {fraction}) are held out",
            100.0 * val.len() as f64 / (val.len() + train.len()) as f64,
            val_tokens = val.len()
        ),
        (HeldOut::Fraction { .. }, None) => {
            eprintln!("validation: the data is too short to hold out a batch besides training; no evaluation")
        }
        (HeldOut::Files { source }, Some(val)) => {
            eprintln!("validation: {} — {} tokens", source.describe(), val.len())
        }
        (HeldOut::Files { .. }, None) => unreachable!("validation files always open a stream"),
    }
    Ok(RunData { train, val, tokenizer, source, validation })
}

/// The data a resumed run trains on: the recorded files (re-hashed), or `--data` if it names the
/// same contents; anything else is refused unless `--allow-data-change`.
fn resumed_source(args: &TrainArgs, state: &TrainState) -> Result<DataSource> {
    let dir = args.resume.as_ref().expect("resuming").display();
    let Some(recorded) = &state.source else {
        if args.data.is_empty() && state.data != corpus::NAME {
            bail!(
                "--resume {dir}: the checkpoint does not record its data's files (written before \
                 2026-11-29); pass --data with the file it trained on ({})",
                state.data
            );
        }
        return match args.data.is_empty() {
            true => Ok(DataSource::Builtin { bytes: BUILTIN_BYTES, seed: BUILTIN_SEED }),
            false => record_files(
                &args.data,
                args.data_format.unwrap_or(TokenFormat::Auto),
                args.doc_separator.as_deref(),
            ),
        };
    };
    let now = match (recorded, args.data.is_empty()) {
        (DataSource::Builtin { .. }, true) => return Ok(recorded.clone()),
        (DataSource::Files { format, doc_separator, files }, true) => {
            let paths: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
            fingerprint(&paths, format, doc_separator.as_deref())
                .with_context(|| format!("--resume {dir}: reading the data the run trained on"))?
        }
        (DataSource::Files { format, doc_separator, .. }, false) => {
            let format = match args.data_format {
                Some(f) => format_name(f).to_string(),
                None => format.clone(),
            };
            let separator = args.doc_separator.clone().or(doc_separator.clone());
            let parsed: TokenFormat = format.parse().map_err(anyhow::Error::msg)?;
            record_files(&args.data, parsed, separator.as_deref())?
        }
        (DataSource::Builtin { .. }, false) => record_files(
            &args.data,
            args.data_format.unwrap_or(TokenFormat::Auto),
            args.doc_separator.as_deref(),
        )?,
    };
    match recorded.difference(&now) {
        None => Ok(now),
        Some(why) if args.allow_data_change => {
            eprintln!("warning: --allow-data-change: {why}; training on {}", now.describe());
            Ok(now)
        }
        Some(why) => bail!(
            "--resume {dir}: {why}. A resumed run trains on the data it started with; pass \
             --allow-data-change to continue on other data anyway"
        ),
    }
}

/// Validation of a fresh run: only when it evaluates (`--eval-every`, or the demo's 50).
fn fresh_validation(args: &TrainArgs) -> Result<Validation> {
    let eval_every = args.eval_every.or(if args.is_demo() { Some(50) } else { None });
    let Some(every) = eval_every else {
        if !args.val_data.is_empty() || args.val_fraction.is_some() {
            bail!("--val-data and --val-fraction need --eval-every N (how often to evaluate)");
        }
        return Ok(Validation { held_out: HeldOut::None, eval_every: None });
    };
    if every == 0 {
        bail!("--eval-every must be at least 1");
    }
    let held_out = if args.val_data.is_empty() {
        let fraction = args.val_fraction.unwrap_or(TrainOptions::default().val_fraction);
        if !(fraction > 0.0 && fraction < 1.0) {
            bail!("--val-fraction must be in (0, 1), got {fraction}");
        }
        HeldOut::Fraction { fraction }
    } else {
        if args.val_fraction.is_some() {
            bail!(
                "--val-fraction holds out part of --data; with --val-data nothing is held out: pass one of them"
            );
        }
        let format = args.data_format.unwrap_or(TokenFormat::Auto);
        HeldOut::Files { source: record_files(&args.val_data, format, args.doc_separator.as_deref())? }
    };
    Ok(Validation { held_out, eval_every: Some(every) })
}

/// Validation of a resumed run: the recorded held-out data (checkpoints before 2026-11-29 always
/// held out `val_fraction`), evaluated every `--eval-every` if given, else as recorded.
fn resumed_validation(args: &TrainArgs, state: &TrainState) -> Result<Validation> {
    let recorded = state.validation.clone().unwrap_or(Validation {
        held_out: HeldOut::Fraction { fraction: state.options.val_fraction },
        eval_every: None,
    });
    let eval_every = args.eval_every.or(recorded.eval_every);
    if matches!(recorded.held_out, HeldOut::None) && args.eval_every.is_some() {
        bail!(
            "--eval-every: this run holds nothing out (it started without --eval-every), and holding \
             out data now would change what it trains on"
        );
    }
    if let HeldOut::Files { source } = &recorded.held_out {
        let now = if args.val_data.is_empty() {
            let DataSource::Files { format, doc_separator, .. } = source else {
                bail!("--resume: validation files recorded as the built-in corpus");
            };
            fingerprint(&source.paths(), format, doc_separator.as_deref())?
        } else {
            let format = args.data_format.unwrap_or(TokenFormat::Auto);
            record_files(&args.val_data, format, args.doc_separator.as_deref())?
        };
        match source.difference(&now) {
            Some(why) if !args.allow_data_change => {
                bail!(
                    "--val-data: {why}; a resumed run validates on the data it started with (or pass --allow-data-change)"
                )
            }
            Some(why) => eprintln!("warning: --allow-data-change: validation data: {why}"),
            None => {}
        }
        return Ok(Validation { held_out: HeldOut::Files { source: now }, eval_every });
    }
    Ok(Validation { held_out: recorded.held_out, eval_every })
}
