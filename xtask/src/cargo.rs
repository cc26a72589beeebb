//! Running cargo from xtask.

use anyhow::{Context, Result, bail};
use dsl::Backend;
use std::process::Command;

/// `cargo` as invoked by the user (`CARGO` is set by `cargo run`).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run_command(mut cmd: Command) -> Result<()> {
    eprintln!("$ {}", describe(&cmd));
    let status = cmd.status().with_context(|| format!("could not start {}", describe(&cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(&cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// The cargo feature flags that compile `backend` in (wgpu is the default feature).
pub fn feature_args(backend: Backend) -> Vec<&'static str> {
    match backend {
        Backend::Wgpu => vec![],
        Backend::Cuda => vec!["--features", "cuda"],
    }
}

/// If this binary lacks `backend`, rebuilds xtask with it and re-runs the same command line
/// there (returning `Ok(true)` once that finished); `Ok(false)` when it is compiled in.
pub fn reexec_with_backend(backend: Backend) -> Result<bool> {
    if backend.is_compiled() {
        return Ok(false);
    }
    if std::env::var_os("CARGO").is_none() {
        bail!(
            "backend `{backend}` is not compiled into this binary; build it with \
             `cargo build --release -p xtask --features {backend}`"
        );
    }
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "--package", "xtask"]).args(feature_args(backend)).arg("--");
    cmd.args(std::env::args_os().skip(1));
    run_command(cmd)?;
    Ok(true)
}
