//! `cargo xtask tune-matmul` end to end on the test device, and a run loading its table: the
//! table's entries, the startup line naming it, and the error for a table that cannot be read.

use std::path::PathBuf;
use std::process::{Command, Output};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-tune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap()
}

#[test]
fn tuning_writes_a_table_that_runs_then_load() {
    let dir = scratch();
    let table = dir.join("table.json");
    let t = table.to_str().unwrap();
    let out =
        xtask(&["tune-matmul", "--preset", "tiny", "--tokens", "64", "--iters", "1", "--json", "--out", t]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gemms = report["gemms"].as_array().unwrap();
    // tiny has grouped-query attention: q/o and k/v differ, so 16 distinct products.
    assert_eq!(gemms.len(), 16, "{report}");
    for g in gemms {
        let timings = g["timings"].as_array().unwrap();
        let names: Vec<_> = timings.iter().map(|t| t["routine"].as_str().unwrap()).collect();
        // The built-in choice first (the reference), then every other routine offered.
        assert_eq!(
            names[0],
            if report["device"].as_str().unwrap().starts_with("cuda") {
                "simple_cmma"
            } else {
                "simple_unit"
            }
        );
        assert!(names.contains(&"double_unit"), "{g}");
        let best = g["best"].as_str().unwrap();
        assert!(timings.iter().any(|t| t["routine"] == best && t["median_ms"].is_number()), "{g}");
    }
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    assert_eq!(saved["device"], report["device"]);
    assert_eq!(saved["entries"].as_array().unwrap().len(), 16);
    assert!(
        saved["measured_by"]
            .as_str()
            .unwrap()
            .starts_with("cargo xtask tune-matmul --preset tiny --tokens 64")
    );

    let run = dir.join("run");
    let out = xtask(&["train", "--steps", "1", "--matmul-table", t, "--out", run.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("matmul routines: 16 measured shapes from {t}")), "{stderr}");

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"device\": \"x\", \"measured_by\": \"\", \"entries\": [{\"m\": 1}]}").unwrap();
    let out = xtask(&[
        "train",
        "--steps",
        "1",
        "--matmul-table",
        bad.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("matmul table {}: missing field", bad.display())), "{stderr}");
    assert!(!stderr.contains("steps,"), "started training:\n{stderr}");
}
