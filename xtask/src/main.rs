//! `cargo xtask`: the project's task runner (alias in `.cargo/config.toml`).
//!
//! - `cargo xtask test [--backend wgpu|cuda]`: every test of the workspace.
//! - `cargo xtask bench [--backend wgpu|cuda] [--json]`: copy bandwidth, then each kernel's
//!   achieved bandwidth and its fraction of the copy bandwidth.
//! - `cargo xtask eval --model DIR --data FILE [--batch B] [--seq-len T] [--batches N] [--json]`:
//!   mean cross-entropy and perplexity of a Hugging Face checkpoint over a token file.
//! - `cargo xtask init --preset NAME --out DIR`: a freshly initialised checkpoint;
//!   `cargo xtask config NAME|DIR`: parameter count and training memory of a configuration.
//!
//! - `cargo xtask train [...]`: training; with no arguments a short run of the `tiny` preset on
//!   the built-in corpus, ending with a sample.
//!
//! - `cargo xtask generate --model DIR --prompt TEXT`: KV-cache generation, streamed.
//! - `cargo xtask sft --model DIR --data FILE.jsonl`: supervised fine-tuning (loss on answers);
//!   `cargo xtask sft-data`: the built-in instruction task (reverse a word) as JSON Lines.
//! - `cargo xtask data-audit --data FILE...`: Llama 2's pretraining-data audit (pronouns,
//!   demographic descriptors, languages, personal data, duplicates); `--bench` for its speed.
//! - `cargo xtask cuda-report [--arch sm_80,sm_90] [--json]`: every CUDA kernel variant,
//!   compiled offline (no GPU): registers, spills, shared memory, whether it fits.
//! - `cargo xtask device-bundle --out DIR [--quick]`: CUDA binaries + `DIR/run.sh`, the one
//!   GPU check (tests, bench, training step, PyTorch baselines side by side).
//! - `cargo xtask tune-matmul [--preset NAME] [--tokens N] [--dtype ...] [--tf32]`: every
//!   matmul routine timed on a training step's GEMMs; the fastest per shape into
//!   `tuning/matmul/`, which runs on the same kind of device load.

mod bench;
mod cargo;
mod cuda_report;
mod data_audit;
mod device_bundle;
mod eval;
mod generate;
mod init;
mod launch;
mod peak;
mod plot;
mod run_data;
mod setup;
mod sft;
mod test;
mod train;
mod tune;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dsl::Backend;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and benchmark the Llama2 kernels", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Never install a Vulkan driver: without this, a wgpu command that finds no adapter on
    /// Debian/Ubuntu installs Mesa's lavapipe (apt-get) and runs again.
    #[arg(
        long,
        global = true,
        env = setup::NO_INSTALL_ENV,
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    no_install: bool,
}

/// `--backend`, shared by every command; falls back to `CUBELLAMA_BACKEND`, then wgpu.
#[derive(clap::Args, Clone, Debug)]
struct BackendArg {
    /// Compute backend: wgpu (Vulkan/Metal/DX12, lavapipe without a GPU) or cuda.
    #[arg(long, env = "CUBELLAMA_BACKEND", value_parser = parse_backend)]
    backend: Option<Backend>,
}

impl BackendArg {
    /// The chosen backend if this binary has it; otherwise rebuilds xtask with it, re-runs the
    /// same command there and returns `None`.
    fn resolve_or_reexec(&self) -> Result<Option<Backend>> {
        let backend = self.backend.unwrap_or(Backend::resolve(None).unwrap_or(Backend::Wgpu));
        if cargo::reexec_with_backend(backend)? {
            return Ok(None);
        }
        Ok(Some(Backend::resolve(Some(backend))?))
    }
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse().map_err(|e: dsl::Error| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Run every test in the workspace on the chosen backend.
    Test(test::TestArgs),
    /// Measure copy bandwidth and each kernel's bandwidth on the chosen backend.
    Bench(bench::BenchArgs),
    /// Train a model (no arguments: a short run of the tiny preset on the built-in corpus).
    Train(Box<train::TrainArgs>),
    /// Supervised fine-tuning on JSON Lines of {"prompt", "response"}: loss on answers only.
    Sft(Box<sft::SftArgs>),
    /// Write the built-in instruction task (reverse a word) as SFT JSON Lines.
    SftData(sft::SftDataArgs),
    /// Mean cross-entropy and perplexity of a checkpoint over a token file.
    Eval(eval::EvalArgs),
    /// Continue a prompt with a checkpoint (KV cache; greedy at --temperature 0).
    Generate(generate::GenerateArgs),
    /// Write a freshly initialised checkpoint (a preset or a config.json's shape).
    Init(init::InitArgs),
    /// Show a configuration (preset, checkpoint or config.json): parameters and training memory.
    Config(init::ConfigArgs),
    /// Audit pretraining data as Llama 2 did: pronouns, demographic descriptors, languages,
    /// personal data, duplicates (no --data: the built-in corpus).
    DataAudit(Box<data_audit::DataAuditArgs>),
    /// Compile every CUDA kernel variant offline (NVRTC + ptxas, no GPU): registers, spills,
    /// shared memory and whether each fits sm_80 / sm_90.
    CudaReport(cuda_report::CudaReportArgs),
    /// Build the CUDA binaries and a run.sh for a GPU machine without Rust: tests, bench, a
    /// training step and PyTorch baselines, reported side by side.
    DeviceBundle(device_bundle::DeviceBundleArgs),
    /// Time every matmul routine the device offers on a model's training-step GEMMs and write
    /// the table of the fastest (tuning/matmul/), which later runs on this device load.
    TuneMatmul(tune::TuneArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match run(cli.command) {
        Err(error) if setup::is_missing_wgpu_adapter(&error) => {
            setup::install_driver_and_rerun(error, cli.no_install)
        }
        result => result,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain, without the backtrace anyhow captures under RUST_BACKTRACE: a
            // user's error is the message, not where in our code it surfaced.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(*args),
        Command::Sft(args) => sft::run(*args),
        Command::SftData(args) => sft::data(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Init(args) => init::init(args),
        Command::Config(args) => init::show(args),
        Command::DataAudit(args) => data_audit::run(*args),
        Command::CudaReport(args) => cuda_report::run(args),
        Command::DeviceBundle(args) => device_bundle::run(args),
        Command::TuneMatmul(args) => tune::run(args),
    }
}
