//! Where a rank stands in its job, and how the job's ranks meet.
//!
//! A worker learns its place from the variables torchrun sets (and `cargo xtask train
//! --nproc-per-node` sets the same for the workers it starts): `RANK` (global, `0..WORLD_SIZE`),
//! `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this node), `MASTER_ADDR` and `MASTER_PORT` (where
//! rank 0 listens). Under SLURM without torchrun, `SLURM_PROCID`, `SLURM_NTASKS` and
//! `SLURM_LOCALID` stand in for the first three.
//!
//! The bootstrap is llm.c's and torchrun's: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every
//! other rank connects (retrying until a deadline, since rank 0 may start later) and sends its
//! rank; rank 0 answers each with the job's 128-byte NCCL unique id once all have come.

use crate::{CollectiveError, Result};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of NCCL's `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// A rank's place in its job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The device index on this node.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// The job from the process environment: `None` when `WORLD_SIZE` (or `SLURM_NTASKS`) is
    /// unset, a single-process run. An error names the variable that is missing or malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let pick = |torch: &str, slurm: &str| {
            var(torch).map(|v| (torch.to_string(), v)).or_else(|| var(slurm).map(|v| (slurm.to_string(), v)))
        };
        let Some(world) = pick("WORLD_SIZE", "SLURM_NTASKS") else { return Ok(None) };
        let number = |(name, value): (String, String)| -> Result<usize> {
            value.trim().parse::<usize>().map_err(|_| CollectiveError::Environment {
                message: format!("{name}={value:?} is not a non-negative integer"),
            })
        };
        let missing = |what: &str| CollectiveError::Environment {
            message: format!(
                "{what} is not set, but WORLD_SIZE/SLURM_NTASKS is (a distributed launch sets both)"
            ),
        };
        let world_size = number(world)?;
        if world_size == 0 {
            return Err(CollectiveError::Environment { message: "WORLD_SIZE must be at least 1".into() });
        }
        let rank = number(pick("RANK", "SLURM_PROCID").ok_or_else(|| missing("RANK"))?)?;
        if rank >= world_size {
            return Err(CollectiveError::Environment {
                message: format!("RANK={rank} is not below WORLD_SIZE={world_size}"),
            });
        }
        let local_rank = match pick("LOCAL_RANK", "SLURM_LOCALID") {
            Some(v) => number(v)?,
            None if world_size == 1 => 0,
            None => return Err(missing("LOCAL_RANK")),
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
        let master_port = match var("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| CollectiveError::Environment {
                message: format!("MASTER_PORT={v:?} is not a port number"),
            })?,
            None if world_size == 1 => DEFAULT_PORT,
            None => return Err(missing("MASTER_PORT")),
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// `host:port` of rank 0's bootstrap listener.
    pub fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// The variables a worker of rank `rank` gets (what [`Self::from_env`] reads).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

/// torchrun's default `MASTER_PORT`.
pub const DEFAULT_PORT: u16 = 29500;

/// Hands `id` (given on rank 0, ignored elsewhere) to every rank of `env`'s job and returns it.
/// Rank 0 waits up to `timeout` for all others to connect; the others retry connecting until
/// `timeout` has passed. Errors name the address and the ranks that never came.
pub fn share_unique_id(
    env: &DistEnv,
    id: Option<[u8; UNIQUE_ID_BYTES]>,
    timeout: Duration,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let address = env.address();
    let fail =
        |message: String| CollectiveError::Bootstrap { rank: env.rank, address: address.clone(), message };
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let id = id.ok_or_else(|| fail("rank 0 has no id to share".into()))?;
        if env.world_size == 1 {
            return Ok(id);
        }
        let listener = TcpListener::bind(&address).map_err(|e| fail(format!("cannot listen: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let mut waiting: BTreeSet<usize> = (1..env.world_size).collect();
        let mut peers = Vec::new();
        while !waiting.is_empty() {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| fail(e.to_string()))?;
                    let mut rank = [0u8; 8];
                    // A stray connection (a port scanner, a stale worker) is dropped, not fatal.
                    if stream.read_exact(&mut rank).is_ok()
                        && waiting.remove(&(u64::from_le_bytes(rank) as usize))
                    {
                        peers.push(stream);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(fail(format!(
                            "rank(s) {:?} did not connect within {timeout:?} (are they started, with the same \
                             MASTER_ADDR/MASTER_PORT?)",
                            waiting.iter().collect::<Vec<_>>()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accept failed: {e}"))),
            }
        }
        for mut peer in peers {
            peer.write_all(&id).map_err(|e| fail(format!("cannot send the id: {e}")))?;
        }
        Ok(id)
    } else {
        loop {
            let attempt = address
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "the address resolves to nothing".to_string()))
                .and_then(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_secs(2)).map_err(|e| e.to_string())
                });
            match attempt {
                Ok(mut stream) => {
                    let remaining =
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    stream.set_read_timeout(Some(remaining)).map_err(|e| fail(e.to_string()))?;
                    stream
                        .write_all(&(env.rank as u64).to_le_bytes())
                        .map_err(|e| fail(format!("cannot send the rank: {e}")))?;
                    let mut id = [0u8; UNIQUE_ID_BYTES];
                    stream.read_exact(&mut id).map_err(|e| fail(format!("no id from rank 0: {e}")))?;
                    return Ok(id);
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(format!("rank 0 could not be reached within {timeout:?}: {e}")));
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Where NCCL's library was looked for, and what was found.
#[derive(Clone, Debug)]
pub struct NcclSearch {
    /// The first `libnccl.so` or `libnccl.so.2` found.
    pub found: Option<PathBuf>,
    /// Every folder looked in, in order.
    pub searched: Vec<PathBuf>,
}

/// The file names NCCL is installed under: the development link and the wheels' soname.
pub const NCCL_NAMES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];

/// The variable naming NCCL's library file explicitly (it wins over every search).
pub const NCCL_LIBRARY_VAR: &str = "CUBELLAMA_NCCL_LIBRARY";

impl NcclSearch {
    /// The error text when nothing was found: what was searched and how to install it.
    pub fn missing_message(&self) -> String {
        let searched: Vec<String> = self.searched.iter().map(|p| p.display().to_string()).collect();
        format!(
            "NCCL's library (libnccl.so or libnccl.so.2) was not found; searched: {}. Install it \
             (`pip install nvidia-nccl-cu12`, or your distribution's libnccl2) or name the file \
             with {NCCL_LIBRARY_VAR}",
            searched.join(", ")
        )
    }

    /// A folder holding `libnccl.so` for the found library, the name cudarc loads: the
    /// library's own folder when it has that name, else `links` with a symbolic link to it
    /// (the wheels ship only `libnccl.so.2`). Put it first on the workers' `LD_LIBRARY_PATH`.
    pub fn library_dir(&self, links: &Path) -> std::io::Result<Option<PathBuf>> {
        let Some(found) = &self.found else { return Ok(None) };
        if found.file_name().is_some_and(|n| n == "libnccl.so") {
            return Ok(found.parent().map(Path::to_path_buf));
        }
        std::fs::create_dir_all(links)?;
        let link = links.join("libnccl.so");
        // Replace a link left by an earlier run (it may point at another install).
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(found, &link)?;
        Ok(Some(links.to_path_buf()))
    }
}

/// Looks for NCCL's library in `dirs`, in order.
pub fn find_nccl_in(dirs: Vec<PathBuf>) -> NcclSearch {
    let found = dirs.iter().flat_map(|d| NCCL_NAMES.iter().map(move |n| d.join(n))).find(|p| p.is_file());
    NcclSearch { found, searched: dirs }
}

/// Looks for NCCL's library: `explicit` (or [`NCCL_LIBRARY_VAR`]) first, then the folders of
/// `LD_LIBRARY_PATH`, the `nvidia/nccl/lib` folder of every Python `site-packages` (where the
/// `nvidia-nccl-cu12`/`cu13` wheels put it), and the usual system folders.
pub fn find_nccl(explicit: Option<&Path>) -> NcclSearch {
    let explicit =
        explicit.map(Path::to_path_buf).or_else(|| std::env::var_os(NCCL_LIBRARY_VAR).map(PathBuf::from));
    if let Some(file) = explicit.filter(|f| f.is_file()) {
        return NcclSearch { searched: vec![file.clone()], found: Some(file) };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    // Python's own answer for where packages live (a missing python3 just adds nothing).
    let python = std::process::Command::new("python3")
        .args(["-c", "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))"])
        .output();
    if let Ok(output) = python {
        for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| !l.is_empty()) {
            let dir = Path::new(line).join("nvidia/nccl/lib");
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/local/cuda/lib64",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    find_nccl_in(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn nccl_is_found_under_either_name_and_linked_for_cudarc() {
        let root = std::env::temp_dir().join(format!("nccl-search-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let search = find_nccl_in(vec![a.clone(), b.clone()]);
        assert!(search.found.is_none());
        let message = search.missing_message();
        assert!(
            message.contains(&a.display().to_string()) && message.contains("nvidia-nccl-cu12"),
            "{message}"
        );
        std::fs::write(b.join("libnccl.so.2"), b"not really").unwrap();
        let search = find_nccl_in(vec![a.clone(), b.clone()]);
        assert_eq!(search.found.as_deref(), Some(b.join("libnccl.so.2").as_path()));
        let links = root.join("links");
        let dir = search.library_dir(&links).unwrap().unwrap();
        assert_eq!(std::fs::read(dir.join("libnccl.so")).unwrap(), b"not really");
        // A second run replaces its link.
        assert_eq!(search.library_dir(&links).unwrap().unwrap(), links);
        std::fs::write(a.join("libnccl.so"), b"dev").unwrap();
        let search = find_nccl_in(vec![a.clone(), b]);
        assert_eq!(search.library_dir(&links).unwrap().unwrap(), a);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        assert_eq!(env_of(&[]).unwrap(), None);
        let env = env_of(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            env,
            DistEnv { rank: 3, world_size: 4, local_rank: 1, master_addr: "node0".into(), master_port: 1234 }
        );
        let map: HashMap<String, String> = env.vars().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(DistEnv::from_vars(|n| map.get(n).cloned()).unwrap().unwrap(), env);
        let slurm = env_of(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_PORT", "9"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr.as_str()),
            (1, 2, 1, "127.0.0.1")
        );
    }

    #[test]
    fn bad_variables_are_named() {
        let message = |pairs: &[(&str, &str)]| env_of(pairs).unwrap_err().to_string();
        assert!(message(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE=\"two\""));
        assert!(message(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(message(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("RANK=2 is not below WORLD_SIZE=2"));
        assert!(
            message(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")])
                .contains("MASTER_PORT is not set")
        );
        assert!(
            message(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_PORT", "99999")])
                .contains("MASTER_PORT=\"99999\"")
        );
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn rank_zero_hands_its_id_to_every_rank() {
        let port = free_port();
        let id = [7u8; UNIQUE_ID_BYTES];
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let env = DistEnv {
                    rank,
                    world_size: 3,
                    local_rank: rank,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                };
                std::thread::spawn(move || {
                    share_unique_id(&env, (rank == 0).then_some(id), Duration::from_secs(20))
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn bootstrap_times_out_naming_the_address_and_ranks() {
        let port = free_port();
        let env = |rank| DistEnv {
            rank,
            world_size: 3,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let message = share_unique_id(&env(1), None, Duration::from_millis(500)).unwrap_err().to_string();
        assert!(
            message.contains(&format!("127.0.0.1:{port}")) && message.contains("could not be reached"),
            "{message}"
        );
        let message = share_unique_id(&env(0), Some([0; UNIQUE_ID_BYTES]), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(message.contains("[1, 2] did not connect"), "{message}");
    }
}
