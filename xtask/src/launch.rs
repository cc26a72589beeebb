//! Several GPUs, torchrun-style: `--nproc-per-node N` starts N worker processes (this binary
//! again, with the same arguments, and `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` set), watches them, and stops the job with an error naming the rank when one
//! fails. A process started with those variables set (by this launcher, torchrun, or SLURM) is
//! a worker: it opens GPU `LOCAL_RANK` and joins the job over NCCL (rank 0 hands out NCCL's id
//! over TCP at `MASTER_ADDR:MASTER_PORT`). Multi-node: run the same command on every node with
//! `--nnodes`, `--node-rank` and rank 0's `--master-addr`.

use anyhow::{Context, Result, bail};
use collectives::Collectives;
use collectives::launch::DistEnv;
use dsl::{Backend, BackendRuntime, Device};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;
use trainer::parallel::{DataParallel, Zero};

#[derive(clap::Args, Clone, Debug)]
pub struct DistArgs {
    /// Worker processes (GPUs) on this node: each trains on its own share of every global
    /// batch (ranks × --batch × --grad-accum sequences per step) and gradients are averaged
    /// over NCCL. Needs --backend cuda.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job (run the same command on each, with its --node-rank) [default: 1].
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes [default: 0].
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the node running rank 0 (its bootstrap listener) [default: 127.0.0.1].
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of rank 0's bootstrap listener [default: 29500].
    #[arg(long, default_value_t = collectives::launch::DEFAULT_PORT)]
    pub master_port: u16,
    /// `0`: every rank keeps all of AdamW's state; `1` (ZeRO-1): each rank keeps and updates
    /// the moments and master weights of its share of the parameters (same numbers, bit for
    /// bit; 12 bytes per parameter divided by the ranks) [default: 0].
    #[arg(long, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub zero: Option<u8>,
    /// Seconds a rank waits for the others (bootstrap, and each collective) before failing
    /// [default: 600].
    #[arg(long, default_value_t = 600)]
    pub dist_timeout: u64,
}

/// What this process is in the job.
pub enum Role {
    /// A single-process run.
    Single,
    /// One rank of a job (this process trains).
    Worker(DistEnv),
    /// This process launched the workers, which have finished.
    Launched,
}

impl DistArgs {
    pub fn zero(&self) -> Zero {
        Zero::from_stage(self.zero.unwrap_or(0)).expect("clap keeps --zero to 0 or 1")
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.dist_timeout.max(1))
    }

    /// Decides this process's role, launching (and waiting for) the workers when asked to.
    pub fn role(&self, backend: Backend) -> Result<Role> {
        if let Some(env) = DistEnv::from_env()? {
            if env.world_size > 1 && backend != Backend::Cuda {
                bail!(
                    "rank {} of {}: data-parallel training needs the CUDA backend (NCCL); \
                     --backend {backend} trains on one device",
                    env.rank,
                    env.world_size
                );
            }
            return Ok(if env.world_size > 1 { Role::Worker(env) } else { Role::Single });
        }
        let per_node = self.nproc_per_node.unwrap_or(1);
        if per_node == 0 || self.nnodes == 0 {
            bail!("--nproc-per-node and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!("--node-rank {} is not below --nnodes {}", self.node_rank, self.nnodes);
        }
        if per_node * self.nnodes == 1 {
            if self.zero == Some(1) {
                eprintln!("note: --zero 1 shards over ranks; with one rank it changes nothing");
            }
            return Ok(Role::Single);
        }
        if backend != Backend::Cuda {
            bail!(
                "--nproc-per-node {per_node} × --nnodes {}: data-parallel training needs the CUDA backend \
                 (NCCL); add --backend cuda",
                self.nnodes
            );
        }
        self.launch(per_node)?;
        Ok(Role::Launched)
    }

    /// Starts this node's workers and waits for them; the first to fail stops the others.
    fn launch(&self, per_node: usize) -> Result<()> {
        let exe = std::env::current_exe().context("finding this program to start the workers")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let world_size = per_node * self.nnodes;
        let nccl = nccl_library_path();
        eprintln!(
            "launching {per_node} worker(s) on node {} of {} (world size {world_size}, rank 0 at {}:{})",
            self.node_rank, self.nnodes, self.master_addr, self.master_port
        );
        let mut children: Vec<(usize, Child)> = Vec::new();
        for local_rank in 0..per_node {
            let env = DistEnv {
                rank: self.node_rank * per_node + local_rank,
                world_size,
                local_rank,
                master_addr: self.master_addr.clone(),
                master_port: self.master_port,
            };
            let mut command = Command::new(&exe);
            command.args(&args).envs(env.vars());
            if let Some(path) = &nccl {
                command.env("LD_LIBRARY_PATH", path);
            }
            match command.spawn() {
                Ok(child) => children.push((env.rank, child)),
                Err(e) => {
                    stop(&mut children);
                    bail!("starting rank {}: {e}", env.rank);
                }
            }
        }
        supervise(children)
    }
}

/// `LD_LIBRARY_PATH` for the workers: a folder with `libnccl.so` (linked to the wheels'
/// `libnccl.so.2` when that is all there is) first, then the current value. `None` when NCCL
/// is not found (the workers then fail with the list of places searched).
fn nccl_library_path() -> Option<std::ffi::OsString> {
    let search = collectives::launch::find_nccl(None);
    let links = std::env::temp_dir().join(format!("cubellama-nccl-{}", std::process::id()));
    let dir = search.library_dir(&links).ok().flatten()?;
    let mut dirs: Vec<PathBuf> = vec![dir];
    if let Some(current) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&current));
    }
    std::env::join_paths(dirs).ok()
}

/// Kills every child still running.
fn stop(children: &mut [(usize, Child)]) {
    for (_, child) in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits for every worker; the first that exits with a failure ends the job, naming it.
fn supervise(mut children: Vec<(usize, Child)>) -> Result<()> {
    loop {
        let mut running = false;
        for i in 0..children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    let rank = *rank;
                    children.remove(i);
                    stop(&mut children);
                    bail!("rank {rank} failed ({status}); the other ranks were stopped");
                }
                Ok(None) => running = true,
                Err(e) => {
                    let rank = *rank;
                    stop(&mut children);
                    bail!("watching rank {rank}: {e}");
                }
            }
        }
        if !running {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The GPU a worker opens: `LOCAL_RANK`. With `NCCL_MULTI_RANK_GPU_ENABLE=1` (NCCL ≥ 2.30's
/// experimental several-ranks-per-GPU mode, for checking the multi-rank path on one GPU) local
/// ranks beyond the GPUs this process sees wrap around onto them.
pub fn worker_device(env: &DistEnv) -> Result<usize> {
    let shared = std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").is_ok_and(|v| v.trim() == "1");
    if !shared {
        return Ok(env.local_rank);
    }
    #[cfg(feature = "cuda")]
    {
        let count = collectives::nccl::Nccl::device_count()?;
        if count == 0 {
            bail!("rank {}: no CUDA device is visible", env.rank);
        }
        Ok(env.local_rank % count)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(env.local_rank)
}

/// This worker's NCCL communicator (CUDA only).
pub fn join<R: BackendRuntime>(dev: &Device<R>, env: &DistEnv, args: &DistArgs) -> Result<DataParallel<R>> {
    let group = nccl_group(dev, env, args.timeout())?;
    Ok(DataParallel::new(group, args.zero()))
}

#[cfg(feature = "cuda")]
fn nccl_group<R: BackendRuntime>(
    dev: &Device<R>,
    env: &DistEnv,
    timeout: Duration,
) -> Result<Box<dyn Collectives<R>>> {
    use cubecl::cuda::CudaRuntime;
    use std::any::Any;
    let Some(cuda) = (dev as &dyn Any).downcast_ref::<Device<CudaRuntime>>() else {
        bail!("data-parallel training needs the CUDA backend (NCCL)");
    };
    let nccl = collectives::nccl::Nccl::init(cuda, env, timeout)?;
    if env.rank == 0 {
        let version = collectives::nccl::Nccl::version().unwrap_or(0);
        eprintln!(
            "NCCL {}.{}.{}: {} ranks joined",
            version / 10000,
            version / 100 % 100,
            version % 100,
            env.world_size
        );
    }
    let group: Box<dyn Collectives<CudaRuntime>> = Box::new(nccl);
    let any: Box<dyn Any> = Box::new(group);
    Ok(*any.downcast::<Box<dyn Collectives<R>>>().expect("R is CudaRuntime here"))
}

#[cfg(not(feature = "cuda"))]
fn nccl_group<R: BackendRuntime>(
    _: &Device<R>,
    env: &DistEnv,
    _: Duration,
) -> Result<Box<dyn Collectives<R>>> {
    bail!(
        "rank {}: data-parallel training needs the CUDA backend (NCCL), which this binary was built without",
        env.rank
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn shell(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    #[test]
    fn a_failing_worker_stops_the_job_naming_its_rank() {
        let start = Instant::now();
        let children = vec![(0, shell("sleep 60")), (1, shell("sleep 0.2; exit 3")), (2, shell("exit 0"))];
        let error = supervise(children).unwrap_err().to_string();
        assert!(error.contains("rank 1 failed") && error.contains('3'), "{error}");
        assert!(start.elapsed() < Duration::from_secs(30), "the sleeping rank was stopped, not waited for");
        assert!(supervise(vec![(0, shell("exit 0")), (1, shell("sleep 0.1"))]).is_ok());
    }

    fn args(per_node: Option<usize>, nnodes: usize, node_rank: usize) -> DistArgs {
        DistArgs {
            nproc_per_node: per_node,
            nnodes,
            node_rank,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            zero: None,
            dist_timeout: 600,
        }
    }

    #[test]
    fn several_ranks_need_cuda_and_sane_flags() {
        // Only when no launcher variables are set (a test run under torchrun would differ).
        if DistEnv::from_env().unwrap().is_some() {
            return;
        }
        assert!(matches!(args(None, 1, 0).role(Backend::Wgpu).unwrap(), Role::Single));
        assert!(matches!(args(Some(1), 1, 0).role(Backend::Wgpu).unwrap(), Role::Single));
        let error = args(Some(2), 1, 0).role(Backend::Wgpu).err().unwrap().to_string();
        assert!(error.contains("needs the CUDA backend") && error.contains("--backend cuda"), "{error}");
        let error = args(Some(2), 2, 2).role(Backend::Cuda).err().unwrap().to_string();
        assert!(error.contains("--node-rank 2 is not below --nnodes 2"), "{error}");
        let error = args(Some(0), 1, 0).role(Backend::Cuda).err().unwrap().to_string();
        assert!(error.contains("at least 1"), "{error}");
    }
}
