//! `cargo xtask test`: every test of the workspace, on one backend.

use crate::BackendArg;
use crate::cargo::{cargo, feature_args, run_command};
use anyhow::Result;
use dsl::Backend;

#[derive(clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Extra arguments for the test binaries (after `--`), e.g. a test-name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

pub fn run_tests(backend: Backend, test_args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    // Release: the tests drive GPU kernels and f64 references over megabytes of data, and
    // sharing the profile with `cargo xtask` compiles the dependency graph once.
    cmd.args(["test", "--release", "--workspace"]).args(feature_args(backend));
    cmd.env(Backend::ENV, backend.name());
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    run_command(cmd)
}

pub fn run(args: TestArgs) -> Result<()> {
    // Not `resolve`: the backend under test need not be compiled into xtask itself.
    let backend = args.backend.backend.unwrap_or(Backend::Wgpu);
    if backend == Backend::Wgpu && backend.is_compiled() {
        // Open the device here first: without a driver this fails in one place, where the
        // driver can be installed, instead of in every test.
        dsl::on_device(backend, Probe)?;
    }
    run_tests(backend, &args.test_args)
}

struct Probe;

impl dsl::OnDevice for Probe {
    type Output = ();
    fn run<R: dsl::BackendRuntime>(self, device: &dsl::Device<R>) {
        eprintln!("device: {}", device.info());
    }
}
