//! Rules of the repository, checked like code.

use std::fs;
use std::path::Path;

fn root_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The README opens with the two commands that do everything on a fresh machine.
#[test]
fn readme_opens_with_the_main_job_and_the_test_command() {
    let readme = root_file("README.md");
    let first_block = readme.split("```sh").nth(1).expect("a ```sh block").split("```").next().unwrap();
    let commands: Vec<&str> = first_block
        .lines()
        .filter_map(|l| l.split('#').next())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands, ["cargo xtask train", "cargo xtask test"], "README's first command block");
}

/// CI runs the README's test command and installs what the wgpu tests need.
#[test]
fn ci_runs_the_readme_test_command() {
    let ci = root_file(".ci/run");
    assert!(ci.lines().any(|l| l.trim() == "cargo xtask test"), ".ci/run must call `cargo xtask test`");
    assert!(ci.contains("mesa-vulkan-drivers") && ci.contains("libvulkan1"));
    assert!(ci.contains("cargo check --workspace --all-targets --features cuda"));
    // Every CUDA kernel variant is compiled offline (NVRTC + ptxas), so one that stops compiling,
    // spills into oblivion or outgrows shared memory shows without a GPU.
    assert!(
        ci.lines().any(|l| l.trim().starts_with("cargo xtask cuda-report")),
        ".ci/run must call cuda-report"
    );
}
