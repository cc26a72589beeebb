//! A machine without a Vulkan driver, as the README's first command meets it: the wgpu backend
//! finds no adapter (simulated by pointing the Vulkan loader at no driver), and the command says
//! what to install in a few lines, with no panic backtrace even when `RUST_BACKTRACE` is set.
//! The install itself (apt-get) is not run here: `CUBELLAMA_NO_INSTALL` turns it off; its
//! command lines are unit tests of `xtask::setup`.

use std::process::Command;

#[test]
fn no_vulkan_driver_is_a_short_message_naming_the_install() {
    let out_dir = std::env::temp_dir().join(format!("cubellama-fresh-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["train", "--steps", "1", "--out"])
        .arg(&out_dir)
        .env("VK_ICD_FILENAMES", "/nonexistent/no-driver.json")
        .env("VK_DRIVER_FILES", "/nonexistent/no-driver.json")
        .env("RUST_BACKTRACE", "1")
        .env("CUBELLAMA_NO_INSTALL", "1")
        .env_remove("CUBELLAMA_BACKEND")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "trained without a driver?\n{stderr}");
    assert!(stderr.contains("no Vulkan driver"), "{stderr}");
    let debian_like = std::fs::read_to_string("/etc/os-release").is_ok_and(|os| {
        os.lines().any(|l| {
            (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
                && (l.contains("debian") || l.contains("ubuntu"))
        })
    });
    if debian_like {
        assert!(
            stderr.contains("apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1"),
            "{stderr}"
        );
        assert!(stderr.contains("not run: --no-install or CUBELLAMA_NO_INSTALL"), "{stderr}");
    }
    for noise in ["stack backtrace", "Stack backtrace", "panicked at", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(noise), "{noise:?} in\n{stderr}");
    }
    assert!(stderr.lines().count() < 12, "a short message, not a trace:\n{stderr}");
    assert!(!out_dir.exists(), "nothing written");
}
