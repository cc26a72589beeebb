//! [`Collectives`] over NCCL, one process per GPU, through cudarc's NCCL bindings (loaded at
//! run time: nothing is needed to build).
//!
//! CubeCL's CUDA streams are private to it, so each collective runs on a stream of our own:
//! the device's queued kernels are waited for first (`Device::sync`), NCCL runs on the raw
//! device pointers of the tensors' buffers (`ComputeClient::get_resource`, which keeps them
//! alive for the call), and the host polls an event recorded after it, with the group's
//! timeout, so a rank whose peers died does not wait forever (on timeout the communicator is
//! aborted and the error names the operation). The synchronisation costs one device drain per
//! collective; the trainer issues one per parameter tensor.
//!
//! NOT YET RUN ON A GPU: this module compiles against cudarc 0.19 and was written from NCCL's
//! documentation; no session with a GPU has run it.
//!
//! The library: cudarc looks for `libnccl.so` (and CUDA-versioned names), while NVIDIA's
//! `nvidia-nccl-cu12`/`cu13` wheels ship `libnccl.so.2`. [`crate::launch::find_nccl`] finds
//! either; `cargo xtask train --nproc-per-node` links the wheel's file into a folder on the
//! workers' `LD_LIBRARY_PATH`, and [`Nccl::init`] fails with the searched places when absent.

use crate::launch::{DistEnv, UNIQUE_ID_BYTES, share_unique_id};
use crate::{CollectiveError, Collectives, Result, TensorMut};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::result as cu;
use cudarc::driver::sys as cu_sys;
use cudarc::nccl::{result as nccl, sys as nccl_sys};
use dsl::{Device, Element, GpuTensor};
use std::time::{Duration, Instant};

/// One rank's NCCL communicator and the stream its collectives run on.
pub struct Nccl {
    rank: usize,
    world_size: usize,
    comm: nccl_sys::ncclComm_t,
    stream: cu_sys::CUstream,
    done: cu_sys::CUevent,
    timeout: Duration,
    aborted: bool,
}

// SAFETY: the communicator, stream and event are used by one thread at a time (`&mut self`);
// NCCL and the CUDA driver allow handing them between threads.
unsafe impl Send for Nccl {}

fn nccl_error(rank: usize, op: &'static str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Nccl { rank, op, message: format!("{e:?}") }
}

impl Nccl {
    /// Joins the job `env` describes on `device` (this rank's GPU, `LOCAL_RANK`): rank 0 makes
    /// NCCL's unique id and hands it out over TCP ([`share_unique_id`], waiting up to
    /// `timeout`), then every rank initialises its communicator. Collectives wait at most
    /// `timeout` too.
    pub fn init(device: &Device<CudaRuntime>, env: &DistEnv, timeout: Duration) -> Result<Self> {
        let rank = env.rank;
        // SAFETY: probing for the library only dlopens it.
        if !unsafe { nccl_sys::is_culib_present() } {
            let search = crate::launch::find_nccl(None);
            return Err(CollectiveError::Nccl { rank, op: "init", message: search.missing_message() });
        }
        let id = if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error(rank, "get_unique_id", e))?;
            Some(id.internal.map(|c| c as u8))
        } else {
            None
        };
        let bytes: [u8; UNIQUE_ID_BYTES] = share_unique_id(env, id, timeout)?;
        let id = nccl_sys::ncclUniqueId { internal: bytes.map(|b| b as std::ffi::c_char) };
        let driver = |op: &'static str| move |e: cu::DriverError| nccl_error(rank, op, e);
        cu::init().map_err(driver("cuInit"))?;
        // CubeCL runs on the device's primary context; NCCL and our stream must use the same one,
        // current on this thread.
        let ordinal = env.local_rank as i32;
        let cu_device = cu::device::get(ordinal).map_err(driver("cuDeviceGet"))?;
        // SAFETY: `cu_device` is a valid device; retaining its primary context is what CubeCL does.
        unsafe {
            let ctx = cu::primary_ctx::retain(cu_device).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            cu::ctx::set_current(ctx).map_err(driver("cuCtxSetCurrent"))?;
        }
        // CubeCL has opened its context by now; make sure it is the same device.
        device.sync("nccl init")?;
        let stream =
            cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(driver("cuStreamCreate"))?;
        let done = cu::event::create(cu_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(driver("cuEventCreate"))?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL; every rank passes the same id and world size.
        unsafe { nccl::comm_init_rank(&mut comm, env.world_size as i32, id, rank as i32) }
            .map_err(|e| nccl_error(rank, "ncclCommInitRank", e))?;
        Ok(Self { rank, world_size: env.world_size, comm, stream, done, timeout, aborted: false })
    }

    /// GPUs this process sees (after `CUDA_VISIBLE_DEVICES`).
    pub fn device_count() -> Result<usize> {
        cu::init().map_err(|e| nccl_error(0, "cuInit", e))?;
        let count = cu::device::get_count().map_err(|e| nccl_error(0, "cuDeviceGetCount", e))?;
        Ok(count.max(0) as usize)
    }

    /// The installed NCCL's version (e.g. 22703 for 2.27.3).
    pub fn version() -> Result<i32> {
        nccl::get_nccl_version().map_err(|e| nccl_error(0, "ncclGetVersion", e))
    }

    /// Waits for the collective just queued on our stream: polls an event (so the wait is
    /// bounded) and NCCL's asynchronous error (so a peer's failure ends it early).
    fn wait(&mut self, op: &'static str) -> Result<()> {
        let rank = self.rank;
        // SAFETY: the event and stream are ours and alive.
        unsafe { cu::event::record(self.done, self.stream) }.map_err(|e| nccl_error(rank, op, e))?;
        let start = Instant::now();
        loop {
            // SAFETY: as above.
            match unsafe { cu::event::query(self.done) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == cu_sys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                Err(e) => return Err(nccl_error(rank, op, e)),
            }
            let mut state = nccl_sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is alive; NCCL writes the state.
            unsafe { nccl_sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if state != nccl_sys::ncclResult_t::ncclSuccess && state != nccl_sys::ncclResult_t::ncclInProgress
            {
                self.abort_comm();
                return Err(nccl_error(rank, op, format!("asynchronous error {state:?} (a peer failed?)")));
            }
            if start.elapsed() > self.timeout {
                self.abort_comm();
                return Err(CollectiveError::Timeout {
                    rank,
                    op,
                    waited: start.elapsed(),
                    missing: Vec::new(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn abort_comm(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: `comm` is alive; after abort it is not used again (see `check_alive`).
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }

    fn check_alive(&self, op: &'static str) -> Result<()> {
        if self.aborted {
            return Err(CollectiveError::Nccl {
                rank: self.rank,
                op,
                message: "the communicator was aborted".into(),
            });
        }
        Ok(())
    }

    /// Runs `call(pointer, elements, type)` on `tensor`'s buffer after the device's queued
    /// work, then waits for it.
    fn run<E: Element>(
        &mut self,
        device: &Device<CudaRuntime>,
        tensor: &GpuTensor<CudaRuntime, E>,
        op: &'static str,
        call: impl FnOnce(
            u64,
            usize,
            nccl_sys::ncclDataType_t,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        self.check_alive(op)?;
        let dtype = match E::DTYPE {
            dsl::DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
            dsl::DType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
            dsl::DType::BF16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            dsl::DType::U32 => nccl_sys::ncclDataType_t::ncclUint32,
            dsl::DType::I32 => nccl_sys::ncclDataType_t::ncclInt32,
        };
        device.sync(op)?;
        let resource = device
            .client()
            .get_resource(tensor.handle().clone())
            .map_err(|e| nccl_error(self.rank, op, e))?;
        call(resource.resource().ptr, tensor.numel(), dtype).map_err(|e| nccl_error(self.rank, op, e))?;
        let waited = self.wait(op);
        drop(resource);
        waited
    }
}

impl Collectives<CudaRuntime> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(
        &mut self,
        device: &Device<CudaRuntime>,
        tensor: &mut GpuTensor<CudaRuntime, f32>,
    ) -> Result<()> {
        let (comm, stream) = (self.comm, self.stream);
        self.run(device, tensor, "all_reduce", |ptr, count, dtype| {
            let p = ptr as *mut std::ffi::c_void;
            // SAFETY: `p` addresses `count` elements of `dtype`, alive until the wait returns.
            unsafe { nccl::all_reduce(p, p, count, dtype, nccl_sys::ncclRedOp_t::ncclSum, comm, stream as _) }
        })
    }

    fn reduce_sum(
        &mut self,
        device: &Device<CudaRuntime>,
        tensor: &mut GpuTensor<CudaRuntime, f32>,
        root: usize,
    ) -> Result<()> {
        let (comm, stream) = (self.comm, self.stream);
        self.run(device, tensor, "reduce", |ptr, count, dtype| {
            let p = ptr as *mut std::ffi::c_void;
            // SAFETY: as in `all_reduce_sum`.
            unsafe {
                nccl::reduce(
                    p,
                    p,
                    count,
                    dtype,
                    nccl_sys::ncclRedOp_t::ncclSum,
                    root as i32,
                    comm,
                    stream as _,
                )
            }
        })
    }

    fn broadcast(
        &mut self,
        device: &Device<CudaRuntime>,
        tensor: TensorMut<'_, CudaRuntime>,
        root: usize,
    ) -> Result<()> {
        let (comm, stream) = (self.comm, self.stream);
        let call = |ptr: u64, count, dtype| {
            let p = ptr as *mut std::ffi::c_void;
            // SAFETY: as in `all_reduce_sum`.
            unsafe { nccl::broadcast(p, p, count, dtype, root as i32, comm, stream as _) }
        };
        match tensor {
            TensorMut::F32(t) => self.run(device, t, "broadcast", call),
            TensorMut::F16(t) => self.run(device, t, "broadcast", call),
            TensorMut::BF16(t) => self.run(device, t, "broadcast", call),
        }
    }

    fn abort(&mut self, _reason: &str) {
        // NCCL cannot carry a message: aborting makes the peers' pending operations fail.
        self.abort_comm();
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the handles are ours; nothing uses them after this.
        unsafe {
            if !self.aborted {
                let _ = nccl::comm_destroy(self.comm);
            }
            let _ = cu::event::destroy(self.done);
            let _ = cu::stream::destroy(self.stream);
        }
    }
}
