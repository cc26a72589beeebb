//! `cargo xtask data-audit`: the pretraining-data audit of Llama 2 (§4.1) over a corpus in
//! any of the trainer's formats (the `audit` crate does the work); `--bench` measures its
//! throughput next to `wc -w` on a generated corpus.

use anyhow::{Context, Result, bail};
use audit::{Descriptors, Format, Input, Options, Report};
use indicatif::{ProgressBar, ProgressStyle};
use model::init::SplitMix64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use trainer::corpus;
use trainer::tokenizer::TextTokenizer;

const NOTES: &str = "\
Words: a word is a maximal run of Unicode letters and digits (char::is_alphanumeric); everything
else separates words, so \"she's\" holds the words \"she\" and \"s\". Words are lower-cased with
Unicode's mapping before matching. Pronouns and descriptor terms match whole words; a multi-word
term matches consecutive words whatever separates them (space, newline, hyphen); matches are
leftmost-longest without overlap (\"native american\" does not also count \"american\").

Built-in descriptor lists: five axes after HolisticBias, written for this project. Left out, as
the Llama 2 paper did, are terms that are mostly not demographic in running text: \"straight\",
\"white\", \"black\" (and \"english\", \"bi\", \"pan\", \"orthodox\"). --descriptors FILE.json
replaces them: {\"axis name\": [\"term\", ...], ...}.

Documents: text files are the trainer's format (blank lines separate documents); JSON Lines hold
one document per line in --text-field; token files (llm.c shards, llama2.c .bin) are decoded with
--tokenizer and split at <s>. Documents are trimmed; empty ones are counted apart.

Languages: whatlang's guess on the first --lang-prefix bytes of each document (its cost is
mostly per document, ~0.15 ms, so it dominates, most on short documents); guesses below
--lang-threshold count as unknown. --lang-every N examines one document in N, chosen by content
hash (percentages are then of the examined documents).

Personal data: e-mail addresses (local@domain.tld), North American and +CC international phone
numbers written with separators, IPv4 addresses (four numbers 0-255).

Memory: a few 1 MiB chunks per thread, plus 16 bytes per distinct document for the duplicate
hashes (xxh3-128 of the text with whitespace collapsed), plus one token file at a time.";

/// Audit a corpus as Llama 2 did: pronouns, demographic descriptors, languages, personal data,
/// exact duplicates.
#[derive(clap::Args)]
#[command(after_long_help = NOTES)]
pub struct DataAuditArgs {
    /// Files of the corpus, audited as one. Without any: the built-in corpus of
    /// `cargo xtask train` (400 kB of generated sentences).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// text (blank-line-separated documents), jsonl or tokens; default from each file's
    /// extension: .jsonl/.ndjson/.json JSON Lines, .bin tokens, anything else text.
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// The JSON Lines field holding a document's text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// A tokenizer.json: counts tokens, and decodes token files (required for those).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Descriptor terms replacing the built-in ones: {"axis name": ["term", ...], ...}.
    #[arg(long)]
    descriptors: Option<PathBuf>,
    /// Print one JSON document on standard output instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw the pronoun and axis percentages as bars into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Count and skip documents with invalid UTF-8 and bad JSON lines instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Language guesses below this confidence (0–1) count as unknown (the paper's 0.5).
    #[arg(long, default_value_t = 0.5)]
    lang_threshold: f64,
    /// Bytes of each document given to language identification.
    #[arg(long, default_value_t = 1024)]
    lang_prefix: usize,
    /// Identify the language of one document in N (chosen by content hash); 0: none.
    #[arg(long, default_value_t = 1)]
    lang_every: u64,
    /// Instead of auditing: generate a corpus of --bench-mb MB in a temporary folder and time
    /// the audit over it next to `wc -w` over the same file.
    #[arg(long)]
    bench: bool,
    /// Size of the --bench corpus in MB.
    #[arg(long, default_value_t = 200)]
    bench_mb: usize,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

impl DataAuditArgs {
    fn options(&self) -> Result<Options> {
        let descriptors = match &self.descriptors {
            Some(path) => Descriptors::load(path)?,
            None => Descriptors::builtin(),
        };
        let tokenizer = match &self.tokenizer {
            Some(path) => Some(TextTokenizer::load(path)?),
            None => None,
        };
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        Ok(Options {
            text_field: self.text_field.clone(),
            skip_bad: self.skip_bad,
            lang_threshold: self.lang_threshold,
            lang_prefix: self.lang_prefix,
            lang_every: self.lang_every,
            tokenizer,
            descriptors,
            threads: self.threads,
            ..Options::default()
        })
    }
}

pub fn run(args: DataAuditArgs) -> Result<()> {
    if args.bench {
        return bench(&args);
    }
    let options = args.options()?;
    let inputs: Vec<Input> = if args.data.is_empty() {
        let text = corpus::text(400_000, 0);
        vec![Input::memory(corpus::NAME, text.into_bytes(), Format::Text)]
    } else {
        args.data.iter().map(|p| Input::file(p, args.format.unwrap_or_else(|| Format::of(p)))).collect()
    };
    let (report, seconds, bytes) = audit_with_progress(&inputs, &options)?;
    // Not println!: it panics when the reader of a pipe (`| head`) has gone.
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        let source = if args.data.is_empty() { corpus::NAME.to_string() } else { describe(&args.data) };
        writeln!(out, "{source}: audited in {seconds:.1} s ({:.1} MB/s)\n", bytes as f64 / 1e6 / seconds)?;
        write!(out, "{}", report.table())?;
    }
    drop(out);
    if let Some(png) = &args.plot {
        bars(&report, png).with_context(|| format!("drawing {}", png.display()))?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

fn describe(paths: &[PathBuf]) -> String {
    match paths {
        [one] => one.display().to_string(),
        many => format!("{} files", many.len()),
    }
}

/// The audit with a progress bar on standard error (bytes, documents, MB/s, ETA); the report,
/// seconds and input bytes.
fn audit_with_progress(inputs: &[Input], options: &Options) -> Result<(Report, f64, u64)> {
    let mut total = 0;
    for input in inputs {
        total += input.len()?;
    }
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{bar:25} {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} [{elapsed} < {eta}]",
        )
        .expect("valid template"),
    );
    let documents = AtomicU64::new(0);
    let started = Instant::now();
    let report = audit::audit(inputs, options, &|bytes, docs| {
        bar.inc(bytes);
        let docs = documents.fetch_add(docs, Ordering::Relaxed) + docs;
        bar.set_message(format!("{docs} documents"));
    });
    bar.finish_and_clear();
    Ok((report?, started.elapsed().as_secs_f64(), total))
}

/// Writes the bench corpus: documents of 1 to 24 lines of generated sentences (the built-in
/// corpus's grammar, plus sentences with pronouns, demographic terms, personal data and a few
/// in French and German), some repeated; about `bytes` bytes. Its document count.
fn write_bench_corpus(path: &Path, bytes: usize) -> Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    // The built-in corpus's sentences, without its paragraph breaks (blank lines would split
    // the documents written here).
    let plain: Vec<String> = corpus::text(2_000_000, 7)
        .split_terminator(['.', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let people = [
        "She said her brother had left",
        "He told them his plan",
        "They wrote that their village was quiet",
        "I think we should ask our neighbours",
        "You will find your answer in the garden",
        "It keeps its promise",
        "The Mexican and Korean students met the Indian teacher",
        "Many Christian and Muslim families live near the river",
        "A gay couple and a transgender artist opened a shop",
        "The female pilot and the male nurse are both American",
        "Native American and African American writers spoke at night",
        "The Hindu temple and the Jewish school share a wall",
    ];
    let pii = [
        "Write to anna.smith@example.com for the schedule",
        "Call (555) 123-4567 after noon",
        "The server at 192.168.1.20 answers slowly",
    ];
    let foreign = [
        "Le petit chat dort près de la rivière pendant que les enfants jouent dans le jardin",
        "Der alte Hund schläft am Fluss, während die Kinder im Garten spielen",
    ];
    let mut rng = SplitMix64(0xA0D1_7000);
    let (mut written, mut documents) = (0usize, 0u64);
    let mut previous = String::new();
    let mut doc = String::new();
    while written < bytes {
        doc.clear();
        if rng.next_u64().is_multiple_of(50) && !previous.is_empty() {
            // An exact duplicate of the previous document, one in fifty.
            doc.push_str(&previous);
        } else {
            let foreign_doc = rng.next_u64().is_multiple_of(20);
            let lines = 1 + rng.next_u64() % 24;
            for line in 0..lines {
                if line > 0 {
                    doc.push('\n');
                }
                for s in 0..(2 + rng.next_u64() % 4) {
                    if s > 0 {
                        doc.push(' ');
                    }
                    let roll = rng.next_u64() % 100;
                    let sentence = if foreign_doc {
                        foreign[(roll % 2) as usize]
                    } else if roll < 70 {
                        plain[(rng.next_u64() % plain.len() as u64) as usize].as_str()
                    } else if roll < 99 {
                        people[(rng.next_u64() % people.len() as u64) as usize]
                    } else {
                        pii[(rng.next_u64() % pii.len() as u64) as usize]
                    };
                    doc.push_str(sentence);
                    doc.push('.');
                }
            }
            previous.clone_from(&doc);
        }
        doc.push_str("\n\n");
        out.write_all(doc.as_bytes())?;
        written += doc.len();
        documents += 1;
    }
    out.flush()?;
    Ok(documents)
}

/// `wc -w FILE` with the caller's locale: (seconds, words).
fn wc_words(path: &Path) -> Result<(f64, u64)> {
    let started = Instant::now();
    let output = Command::new("wc").arg("-w").arg(path).output().context("running wc -w")?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("wc -w failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let words = text.split_whitespace().next().and_then(|w| w.parse().ok()).context("reading wc's count")?;
    Ok((seconds, words))
}

fn bench(args: &DataAuditArgs) -> Result<()> {
    let options = args.options()?;
    let dir = std::env::temp_dir().join(format!("cubellama-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("corpus.txt");
    let result = bench_in(args, &options, &path);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench_in(args: &DataAuditArgs, options: &Options, path: &Path) -> Result<()> {
    let started = Instant::now();
    let documents = write_bench_corpus(path, args.bench_mb * 1_000_000)?;
    let bytes = std::fs::metadata(path)?.len();
    let mb = bytes as f64 / 1e6;
    let threads = options.threads.unwrap_or_else(rayon_threads);
    println!(
        "corpus: {mb:.1} MB, {documents} documents (mean {:.0} bytes), written in {:.1} s; {threads} threads",
        bytes as f64 / documents as f64,
        started.elapsed().as_secs_f64()
    );
    let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()).map(|s| format!("{v}={s}")))
        .unwrap_or_else(|| "POSIX locale".into());
    // Other work on the machine slows the two-thread audit more than the one-thread wc.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!("load average before the runs: {}", load.join(" "));
    }
    let (wc_seconds, wc_count) = wc_words(path)?;
    let wc_rate = mb / wc_seconds;
    println!("wc -w ({locale}): {wc_seconds:.2} s, {wc_rate:.1} MB/s ({wc_count} words by its rule)");
    let input = [Input::file(path, Format::Text)];
    let mut runs =
        vec![(format!("audit, language of every {}th document", options.lang_every), options.clone())];
    if options.lang_every == 1 {
        runs[0].0 = "audit (language of every document)".into();
    }
    for every in [16, 0] {
        if options.lang_every != every {
            let label = if every == 0 {
                "audit without language identification".to_string()
            } else {
                format!("audit, language of one document in {every}")
            };
            runs.push((label, Options { lang_every: every, ..options.clone() }));
        }
    }
    for (label, run_options) in runs {
        let (report, seconds, _) = audit_with_progress(&input, &run_options)?;
        let rate = mb / seconds;
        println!(
            "{label}: {seconds:.2} s, {rate:.1} MB/s, {:.2}× wc -w ({} documents, {} words, {:.2}% duplicates)",
            rate / wc_rate,
            report.documents,
            report.words,
            report.duplicates.percent
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The PNG: pronoun groups on the left, demographic axes on the right, as % of documents.
fn bars(report: &Report, png: &Path) -> Result<()> {
    crate::plot::font().map_err(anyhow::Error::msg)?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    let draw_error = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let (left, right) = root.split_horizontally(600);
    let pronouns: Vec<(String, f64)> =
        report.pronouns.rows().iter().map(|(_, label, share)| (label.to_string(), share.percent)).collect();
    let axes: Vec<(String, f64)> =
        report.descriptors.0.iter().map(|(name, axis)| (name.clone(), axis.percent)).collect();
    bar_chart(&left, "pronouns", &pronouns, RGBColor(31, 119, 180)).map_err(|e| draw_error(&e))?;
    bar_chart(&right, "demographic axes", &axes, RGBColor(255, 127, 14)).map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

/// Horizontal bars (first on top) with their values, in % of documents.
fn bar_chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    bars: &[(String, f64)],
    color: RGBColor,
) -> Result<(), Box<dyn std::error::Error>> {
    let font = crate::plot::FONT_FAMILY;
    let n = bars.len();
    let high = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (font, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(150)
        // `a..b` segmented has a segment per value of a..=b: n bars need 0..n - 1.
        .build_cartesian_2d(0.0..high, (0..n.max(1) - 1).into_segmented())?;
    // Segment 0 is at the bottom: bar i goes to segment n - 1 - i.
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(s) if *s < n => bars[n - 1 - s].0.clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&label)
        .x_desc("% of documents")
        .label_style((font, 14))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
        let s = n - 1 - i;
        let mut bar = Rectangle::new(
            [(0.0, SegmentValue::Exact(s)), (*value, SegmentValue::Exact(s + 1))],
            color.filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
        Text::new(format!(" {value:.1}"), (*value, SegmentValue::CenterOf(n - 1 - i)), (font, 13))
    }))?;
    Ok(())
}
