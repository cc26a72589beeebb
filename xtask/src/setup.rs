//! The first command on a fresh machine: when the wgpu backend finds no adapter (no Vulkan
//! driver), install Mesa's lavapipe, a Vulkan driver that runs on the CPU, and run the command
//! again. On Debian and Ubuntu that is `apt-get install mesa-vulkan-drivers libvulkan1` (through
//! `sudo` when not root), said before it runs; elsewhere the exact command for the system is
//! printed and the command fails. `--no-install` or `CUBELLAMA_NO_INSTALL=1` turns the install
//! off.

use anyhow::{Context, Result, bail};
use dsl::Backend;
use std::process::Command;

/// Set to anything but `0`/`false` to never install (same as `--no-install`).
pub const NO_INSTALL_ENV: &str = "CUBELLAMA_NO_INSTALL";
/// Set on the re-run after an install, so a driver that still finds no adapter is an error
/// rather than a loop.
const RERUN_ENV: &str = "CUBELLAMA_SETUP_RERUN";

/// The Debian/Ubuntu packages: Mesa's Vulkan drivers (lavapipe among them) and the loader.
pub const APT_PACKAGES: [&str; 2] = ["mesa-vulkan-drivers", "libvulkan1"];

/// Whether `error` is the wgpu backend failing to find an adapter.
pub fn is_missing_wgpu_adapter(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<dsl::Error>(),
            Some(dsl::Error::NoDevice { backend: Backend::Wgpu, .. })
        )
    })
}

/// The parts of `/etc/os-release` that choose a package manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    pub id: String,
    pub id_like: Vec<String>,
    pub pretty_name: String,
}

impl OsRelease {
    /// Parses the `KEY=value` lines of os-release(5) (values optionally quoted).
    pub fn parse(text: &str) -> Self {
        let mut os = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
            match key.trim() {
                "ID" => os.id = value.to_ascii_lowercase(),
                "ID_LIKE" => os.id_like = value.split_whitespace().map(|s| s.to_ascii_lowercase()).collect(),
                "PRETTY_NAME" => os.pretty_name = value,
                _ => {}
            }
        }
        os
    }

    /// This machine's, when it has one.
    pub fn current() -> Option<Self> {
        ["/etc/os-release", "/usr/lib/os-release"]
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .map(|text| Self::parse(&text))
    }

    fn is(&self, family: &str) -> bool {
        self.id == family || self.id_like.iter().any(|like| like == family)
    }

    fn name(&self) -> &str {
        if self.pretty_name.is_empty() { &self.id } else { &self.pretty_name }
    }
}

/// How to get a Vulkan driver on a system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallPlan {
    /// Commands this tool runs itself (Debian/Ubuntu), each a program and its arguments.
    Run(Vec<Vec<String>>),
    /// The command the user should run (other systems).
    Tell(String),
}

/// The install for `os` (`None`: no os-release, e.g. macOS or Windows); `root` decides `sudo`.
pub fn install_plan(os: Option<&OsRelease>, root: bool) -> InstallPlan {
    let sudo = if root { "" } else { "sudo " };
    let Some(os) = os else {
        return InstallPlan::Tell(if cfg!(target_os = "macos") {
            "nothing to install: wgpu uses Metal on macOS, so no Metal device was usable".into()
        } else if cfg!(windows) {
            "install or update the GPU's driver (DX12 or Vulkan); without a GPU, Mesa's lavapipe \
             (e.g. from the mesa-dist-win builds)"
                .into()
        } else {
            "install Mesa's Vulkan drivers (lavapipe) and the Vulkan loader with the system's package manager"
                .into()
        });
    };
    if os.is("debian") || os.is("ubuntu") {
        let with_sudo = |args: &[&str]| -> Vec<String> {
            let mut command: Vec<String> = if root { vec![] } else { vec!["sudo".into()] };
            command.extend(args.iter().map(|s| s.to_string()));
            command
        };
        let mut install = vec!["apt-get", "install", "-y", "--no-install-recommends"];
        install.extend(APT_PACKAGES);
        return InstallPlan::Run(vec![with_sudo(&["apt-get", "update"]), with_sudo(&install)]);
    }
    let command = if os.is("fedora") || os.is("rhel") || os.is("centos") {
        format!("{sudo}dnf install -y mesa-vulkan-drivers vulkan-loader")
    } else if os.is("arch") {
        format!("{sudo}pacman -S --needed vulkan-swrast vulkan-icd-loader")
    } else if os.is("suse") || os.is("opensuse") {
        format!("{sudo}zypper install libvulkan_lvp libvulkan1")
    } else if os.is("alpine") {
        format!("{sudo}apk add mesa-vulkan-swrast vulkan-loader")
    } else {
        format!(
            "install Mesa's Vulkan drivers (lavapipe) and the Vulkan loader with {}'s package manager",
            os.name()
        )
    };
    InstallPlan::Tell(command)
}

fn is_root() -> bool {
    // `id -u` rather than libc: one process per fresh-machine setup costs nothing.
    Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// After `error` (the wgpu backend found no adapter): installs the driver where this tool can
/// and runs this same command again, returning its outcome; otherwise an error that says what
/// to run.
pub fn install_driver_and_rerun(error: anyhow::Error, no_install: bool) -> Result<()> {
    let plan = install_plan(OsRelease::current().as_ref(), is_root());
    let commands = match plan {
        InstallPlan::Run(commands) if !no_install => commands,
        InstallPlan::Run(commands) => {
            let lines: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
            return Err(error.context(format!(
                "no Vulkan driver: install Mesa's lavapipe with `{}` (not run: --no-install or {NO_INSTALL_ENV})",
                lines.join(" && ")
            )));
        }
        InstallPlan::Tell(command) => {
            return Err(error.context(format!("no Vulkan driver for the wgpu backend: {command}")));
        }
    };
    if std::env::var_os(RERUN_ENV).is_some() {
        return Err(error.context(format!(
            "wgpu still finds no adapter after installing {}; check `vulkaninfo --summary` (package vulkan-tools)",
            APT_PACKAGES.join(" ")
        )));
    }
    eprintln!(
        "The wgpu backend found no Vulkan adapter ({error}).\nInstalling Mesa's lavapipe, a Vulkan \
         driver that runs on the CPU, so this command can run (--no-install or {NO_INSTALL_ENV}=1 \
         skips this):"
    );
    for command in &commands {
        eprintln!("$ {}", command.join(" "));
        let status = Command::new(&command[0])
            .args(&command[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("could not start `{}`", command.join(" ")))?;
        if !status.success() {
            bail!("`{}` failed ({status}); run it by hand, then this command again", command.join(" "));
        }
    }
    eprintln!("Installed; running the command again.");
    let exe = std::env::current_exe().context("finding this program to run it again")?;
    let status = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(RERUN_ENV, "1")
        .status()
        .context("running the command again")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str =
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\n";
    const UBUNTU: &str = "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nPRETTY_NAME=\"Ubuntu 24.04 LTS\"\n";
    const FEDORA: &str = "NAME=\"Fedora Linux\"\nID=fedora\nPRETTY_NAME=\"Fedora Linux 41\"\n";
    const MINT: &str = "NAME=\"Linux Mint\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
    const GENTOO: &str = "NAME=Gentoo\nID=gentoo\nPRETTY_NAME=\"Gentoo Linux\"\n";

    #[test]
    fn os_release_is_parsed_with_and_without_quotes() {
        let os = OsRelease::parse(MINT);
        assert_eq!(os.id, "linuxmint");
        assert_eq!(os.id_like, ["ubuntu", "debian"]);
        assert_eq!(OsRelease::parse(DEBIAN).pretty_name, "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn debian_and_its_family_install_mesa_with_apt_through_sudo_unless_root() {
        let install = "apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1";
        for text in [DEBIAN, UBUNTU, MINT] {
            let os = OsRelease::parse(text);
            let as_root = InstallPlan::Run(vec![
                vec!["apt-get".to_string(), "update".into()],
                install.split(' ').map(String::from).collect(),
            ]);
            assert_eq!(install_plan(Some(&os), true), as_root, "{text}");
            let InstallPlan::Run(commands) = install_plan(Some(&os), false) else { panic!("{text}") };
            assert_eq!(commands[0].join(" "), "sudo apt-get update");
            assert_eq!(commands[1].join(" "), format!("sudo {install}"));
        }
    }

    #[test]
    fn other_systems_are_told_the_exact_command() {
        let fedora = install_plan(Some(&OsRelease::parse(FEDORA)), false);
        assert_eq!(fedora, InstallPlan::Tell("sudo dnf install -y mesa-vulkan-drivers vulkan-loader".into()));
        let InstallPlan::Tell(gentoo) = install_plan(Some(&OsRelease::parse(GENTOO)), true) else { panic!() };
        assert!(gentoo.contains("Gentoo Linux's package manager"), "{gentoo}");
    }

    #[test]
    fn only_a_wgpu_no_device_error_asks_for_the_driver() {
        let no_adapter =
            anyhow::Error::new(dsl::Error::NoDevice { backend: Backend::Wgpu, reason: "x".into() });
        assert!(is_missing_wgpu_adapter(&no_adapter.context("opening the device")));
        let cuda = anyhow::Error::new(dsl::Error::NoDevice { backend: Backend::Cuda, reason: "x".into() });
        assert!(!is_missing_wgpu_adapter(&cuda));
        assert!(!is_missing_wgpu_adapter(&anyhow::anyhow!("something else")));
    }
}
