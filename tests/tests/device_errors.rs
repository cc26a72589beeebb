//! CubeCL reports a kernel that fails to compile or launch only on its device thread: launch,
//! sync and read all return Ok and the output keeps its old contents. `Device::sync` and
//! `GpuTensor::to_vec` must turn that into an error. (Its own test binary: the failures here
//! are process-wide and would leak into unrelated tests running beside them.)

use cubecl::prelude::*;
use dsl::{BackendRuntime, Device, GpuTensor};
use tests::on_test_backend;

#[cube(launch)]
fn write_one<F: Float>(out: &mut Array<F>) {
    if UNIT_POS == 0 {
        out[0] = F::new(1.0);
    }
}

#[cube(launch)]
fn oversized_shared(out: &mut Array<f32>, #[comptime] len: usize) {
    let mut shared = SharedMemory::<f32>::new(len);
    shared[UNIT_POS as usize] = out[0];
    sync_cube();
    out[0] = shared[len - 1 - UNIT_POS as usize];
}

/// bf16 where the backend cannot compile it (wgpu) must fail loudly; where it can (CUDA) the
/// kernel must really run.
fn unsupported_element_kernel<R: BackendRuntime>(dev: &Device<R>) {
    let handle = dev.client().create_from_slice(&[0u8; 4]);
    // Bypasses the dtype check on purpose: this is what the check protects against.
    write_one::launch::<half::bf16, R>(
        dev.client(),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        unsafe { ArrayArg::from_raw_parts(handle.clone(), 2) },
    );
    let outcome = dev.sync("bf16 probe");
    if dev.supports::<half::bf16>() {
        outcome.expect("bf16 is advertised, so the kernel must run");
        let bytes = dev.client().read_one(handle).unwrap();
        assert_eq!(half::bf16::from_le_bytes([bytes[0], bytes[1]]), half::bf16::ONE);
    } else {
        let err = outcome.expect_err("a kernel the device cannot compile must be reported");
        assert!(err.to_string().contains("bf16 probe"), "{err}");
    }
}

fn oversized_shared_memory<R: BackendRuntime>(dev: &Device<R>) {
    let out = GpuTensor::<R, f32>::full(dev, &[1], 5.0).unwrap();
    dev.sync("setup").unwrap();
    let too_many = dev.info().max_shared_memory_bytes / 4 + 1024;
    oversized_shared::launch::<R>(
        dev.client(),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        out.as_array_arg(),
        too_many,
    );
    let err = dev
        .sync("oversized shared memory")
        .expect_err("a launch over the shared-memory limit must be reported");
    assert!(err.to_string().contains("oversized shared memory"), "{err}");
}

fn both<R: BackendRuntime>(dev: &Device<R>) {
    unsupported_element_kernel(dev);
    oversized_shared_memory(dev);
}

/// One test, run in sequence: a failure is process-wide, so two of these side by side could
/// each see the other's.
#[test]
fn kernel_failures_on_the_device_thread_are_errors() {
    on_test_backend!(both);
}
