//! `cargo xtask train` killed with SIGKILL mid-run, then `--resume`d without repeating its data
//! or options, logs the same losses bit for bit as a run that was never interrupted; the
//! checkpoint it resumes from is whole even though the kill may land in the middle of writing
//! one. A resume that would train on changed data or with other options is refused, naming them.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 8;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cargo xtask train` on `data` into `dir/out`; a resumed run takes its data and options from
/// the checkpoint, so only fresh runs name the data, preset and recipe.
fn train(dir: &Path, data: &Path, out: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("train");
    if !extra.contains(&"--resume") {
        cmd.args(["--data", data.to_str().unwrap(), "--data-format", "llama2c"]);
        cmd.args(["--preset", "tiny", "--batch", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2"]);
        cmd.args(["--steps", &STEPS.to_string()]);
    }
    cmd.args(["--out", dir.join(out).to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The last logged loss of each step (a resumed run appends after the killed one's lines).
fn losses(log: &Path) -> BTreeMap<u64, u64> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap().to_bits()))
        .collect()
}

fn saved_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn a_run_killed_mid_training_resumes_bit_identically() {
    let dir = scratch();
    let data = dir.join("corpus.bin");
    let text: String = (0..400)
        .map(|i| {
            format!("The {} cat sees the {} dog. ", ["old", "small", "kind"][i % 3], ["red", "big"][i % 2])
        })
        .collect();
    let bytes: Vec<u8> = text.bytes().flat_map(|b| (b as u16).to_le_bytes()).collect();
    std::fs::write(&data, bytes).unwrap();

    let status = train(&dir, &data, "straight", &[]).status().unwrap();
    assert!(status.success(), "uninterrupted run failed");
    let want = losses(&dir.join("straight-log.jsonl"));
    assert_eq!(want.len() as u64, STEPS);

    // Save every step; kill as soon as a checkpoint past step 2 exists (likely mid-save).
    let mut child = train(&dir, &data, "killed", &["--save-every", "1"]).spawn().unwrap();
    let killed_dir = dir.join("killed");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if saved_step(&killed_dir).is_some_and(|s| s >= 3) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let resumed_from = saved_step(&killed_dir).expect("the checkpoint survives the kill");
    assert!(resumed_from < STEPS, "killed too late to test resuming");

    let status = train(&dir, &data, "killed", &["--resume", killed_dir.to_str().unwrap()]).status().unwrap();
    assert!(status.success(), "resumed run failed");
    let got = losses(&dir.join("killed-log.jsonl"));
    assert_eq!(got, want, "losses after resuming from step {resumed_from} differ from the uninterrupted run");

    // Refused before any step: options that change the numbers, then data that changed.
    let straight = dir.join("straight");
    let refused = |extra: &[&str], wanted: &[&str]| {
        let mut args = vec!["--resume", straight.to_str().unwrap(), "--steps", "9"];
        args.extend(extra);
        let out = train(&dir, &data, "straight", &args).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted:\n{stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "{args:?}: no {w:?} in\n{stderr}");
        }
    };
    // --batch 2 is the run's own value: accepted; --lr is not.
    refused(
        &["--lr", "1e-3", "--batch", "2"],
        &["this option would change the run's numbers: --lr 0.001 (the run's: 0.003)."],
    );
    // The precision policy is part of the numbers too.
    refused(
        &["--master-weights", "none", "--loss-scale", "dynamic"],
        &[
            "these options would change the run's numbers: --master-weights none (the run's: f32), --loss-scale \
           dynamic (the run's: off)",
        ],
    );
    refused(
        &["--loss-scale-init", "1024"],
        &["--loss-scale-init and --loss-scale-growth-interval need loss scaling"],
    );
    let other = dir.join("other.bin");
    std::fs::write(&other, [1u8, 0, 2, 0]).unwrap();
    refused(
        &["--data", other.to_str().unwrap()],
        &["the run read", "corpus.bin", "other.bin", "--allow-data-change"],
    );
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&data, bytes).unwrap();
    refused(&[], &["corpus.bin changed since the run read it"]);
    let _ = std::fs::remove_dir_all(&dir);
}
