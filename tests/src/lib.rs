//! The shared test rig: which device the tests run on, seeded data, the per-dtype tolerance
//! table, and the one comparison every kernel test uses.
//!
//! Tests run on the backend chosen by feature and `CUBELLAMA_BACKEND` (wgpu by default, which
//! is Mesa's lavapipe on a machine without a GPU). Test bodies are generic over the runtime and
//! are instantiated with [`on_test_backend!`].

pub mod compare;
pub mod data;

pub use compare::{Tolerance, assert_close, check_close, check_close_scaled};
pub use data::{Rng, TestFloat};

use dsl::{Backend, BackendRuntime, Device};

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
