//! The shared test rig: which device the tests run on, seeded data, the per-dtype tolerance
//! table, and the one comparison every kernel test uses.
//!
//! Tests run on the backend chosen by feature and `CUBELLAMA_BACKEND` (wgpu by default, which
//! is Mesa's lavapipe on a machine without a GPU). Test bodies are generic over the runtime and
//! are instantiated with [`on_test_backend!`].

pub mod compare;
pub mod data;
pub mod models;

pub use compare::{Tolerance, assert_close, check_against_naive, check_close, check_close_scaled, normwise};
pub use data::{DataRng, TestFloat};

use dsl::{Backend, BackendRuntime, Device, Error, GpuTensor};
use proptest::test_runner::TestCaseError;

/// The backend the tests run on: `CUBELLAMA_BACKEND` if set, else the first compiled one.
pub fn test_backend() -> Backend {
    Backend::resolve(None).unwrap_or_else(|e| panic!("cannot choose the test backend: {e}"))
}

pub fn open_device<R: BackendRuntime>() -> Device<R> {
    Device::open().unwrap_or_else(|e| panic!("cannot open the test device: {e}"))
}

/// `on_test_backend!(f, T…)` calls the generic `f::<R, T…>(&device)` on the test backend's
/// runtime `R`.
#[macro_export]
macro_rules! on_test_backend {
    ($f:ident $(, $generic:ty)*) => {
        match $crate::test_backend() {
            #[cfg(feature = "wgpu")]
            dsl::Backend::Wgpu => {
                $f::<dsl::runtimes::WgpuRuntime $(, $generic)*>(&$crate::open_device())
            }
            #[cfg(feature = "cuda")]
            dsl::Backend::Cuda => {
                $f::<dsl::runtimes::CudaRuntime $(, $generic)*>(&$crate::open_device())
            }
            #[allow(unreachable_patterns)]
            other => panic!("backend {other} is not compiled into the tests"),
        }
    };
}

/// One `#[test]` per storage type for a generic `check::<R, F>(&device)`: f32, f16, and bf16
/// (which on a device without bf16 checks the clean refusal instead).
#[macro_export]
macro_rules! test_each_dtype {
    ($check:ident => $f32_test:ident, $f16_test:ident, $bf16_test:ident) => {
        #[test]
        fn $f32_test() {
            $crate::on_test_backend!($check, f32);
        }

        #[test]
        fn $f16_test() {
            $crate::on_test_backend!($check, half::f16);
        }

        /// Runs where the device stores bf16 (CUDA); elsewhere checks the clean refusal.
        #[test]
        fn $bf16_test() {
            $crate::on_test_backend!($check, half::bf16);
        }
    };
}

/// Runs a property with [`proptest_config`] and panics with proptest's report (the minimal
/// failing case and the comparison report) if it fails.
pub fn run_property<S: proptest::strategy::Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = proptest::test_runner::TestRunner::new(proptest_config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
}

/// Proptest settings for kernel properties: few cases (each one launches GPU work, and on
/// lavapipe the GPU is two CPU cores), no persistence files, a fixed seed-independent budget.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..proptest::test_runner::Config::default()
    }
}

/// A launch or transfer error as a proptest failure.
pub fn fail(e: Error) -> TestCaseError {
    TestCaseError::fail(format!("launch failed: {e}"))
}

/// Uploads f64 values rounded to `F`.
pub fn upload<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    values: &[f64],
    shape: &[usize],
) -> Result<GpuTensor<R, F>, TestCaseError> {
    GpuTensor::from_f64(dev, values, shape).map_err(fail)
}

/// An output tensor filled with NaN, so a kernel that silently does not run cannot pass.
pub fn nan_tensor<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    shape: &[usize],
) -> Result<GpuTensor<R, F>, TestCaseError> {
    GpuTensor::full(dev, shape, F::from_f64_rounded(f64::NAN)).map_err(fail)
}

pub fn download<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    t: &GpuTensor<R, F>,
) -> Result<Vec<f64>, TestCaseError> {
    t.to_f64_vec(dev).map_err(fail)
}

/// Where the device cannot store `F` (bf16 on wgpu), checks that uploading is refused with
/// an error naming the type, and returns true: the caller then has nothing else to test.
pub fn refuses_unsupported<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) -> bool {
    if dev.supports::<F>() {
        return false;
    }
    let err = GpuTensor::<R, F>::from_f64(dev, &[1.0], &[1]).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedDType { dtype, .. } if dtype == F::DTYPE),
        "expected an unsupported-dtype error for {}, got {err}",
        F::DTYPE
    );
    true
}

/// Central differences `(f(x + h·e_i) − f(x − h·e_i)) / 2h` for every `i`.
pub fn finite_differences(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += h;
            minus[i] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        })
        .collect()
}

/// Tolerance for a reference backward against [`finite_differences`] with h = 1e-6 in f64.
pub const FINITE_DIFFERENCE_TOL: Tolerance = Tolerance { atol: 1e-6, rtol: 1e-6 };
