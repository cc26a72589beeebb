//! `cargo xtask data-audit` end to end: the binary's JSON, its plot, and its error for a bad line.

use std::path::PathBuf;
use std::process::Command;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-data-audit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

#[test]
fn audits_files_as_one_corpus_and_prints_json() {
    let dir = scratch_dir("json");
    let text = dir.join("a.txt");
    let jsonl = dir.join("b.jsonl");
    // a.txt: "She is Mexican." and "We met him."; b.jsonl: "She is Mexican." again.
    std::fs::write(&text, "She is Mexican.\n\nWe met him.\n").unwrap();
    std::fs::write(&jsonl, "{\"text\": \"She is Mexican.\"}\n").unwrap();
    let png = dir.join("bars.png");
    let output = xtask()
        .args(["data-audit", "--json", "--lang-every", "0", "--data"])
        .args([&text, &jsonl])
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // 3 documents: She in 2 (66.67%), He in 1, 1st person in 1; Nationality in 2, the third
    // document repeats the first (1 duplicate); 3 + 3 + 3 = 9 words.
    assert_eq!(report["documents"], 3);
    assert_eq!(report["words"], 9);
    assert_eq!(report["pronouns"]["she"]["documents"], 2);
    assert_eq!(report["pronouns"]["he"]["documents"], 1);
    assert_eq!(report["pronouns"]["first_person"]["documents"], 1);
    assert_eq!(report["descriptors"]["Nationality"]["documents"], 2);
    assert_eq!(report["descriptors"]["Nationality"]["terms"][0]["term"], "mexican");
    assert_eq!(report["duplicates"]["documents"], 1);
    assert!(std::fs::metadata(&png).unwrap().len() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_line_is_named_by_file_and_line() {
    let dir = scratch_dir("bad");
    let jsonl = dir.join("bad.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n").unwrap();
    let output = xtask().args(["data-audit", "--lang-every", "0", "--data"]).arg(&jsonl).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.jsonl: line 2: no \"text\" field"), "{stderr}");
    // --skip-bad counts it instead.
    let output = xtask()
        .args(["data-audit", "--json", "--skip-bad", "--lang-every", "0", "--data"])
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((report["documents"].as_u64(), report["skipped"].as_u64()), (Some(1), Some(1)));
    let _ = std::fs::remove_dir_all(&dir);
}
