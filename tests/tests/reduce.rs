//! The cube-wide reduction building block (dsl::reduce), both variants, against f64.

use cubecl::prelude::*;
use dsl::{BackendRuntime, CubeReduce, Device, GpuTensor, cube_max, cube_sum};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::{DataRng, Tolerance, check_close, check_close_scaled, on_test_backend, run_property};

/// Row sums and maxima, grid-striding over rows so that each cube reuses its shared memory
/// (which is what the trailing barrier of `cube_reduce` protects).
#[cube(launch)]
fn row_sum_max_kernel(
    sums: &mut Array<f32>,
    maxima: &mut Array<f32>,
    x: &Array<f32>,
    rows: u32,
    cols: u32,
    #[comptime] cfg: CubeReduce,
) {
    let mut row = CUBE_POS;
    while row < rows as usize {
        let base = row * cols as usize;
        let mut sum = f32::new(0.0);
        let mut max = f32::min_value();
        let mut c = UNIT_POS as usize;
        while c < cols as usize {
            let v = x[base + c];
            sum += v;
            max = f32::max(max, v);
            c += CUBE_DIM as usize;
        }
        let total = cube_sum(sum, cfg);
        let maximum = cube_max(max, cfg);
        if UNIT_POS == 0 {
            sums[row] = total;
            maxima[row] = maximum;
        }
        row += CUBE_COUNT;
    }
}

fn check<R: BackendRuntime>(
    dev: &Device<R>,
    (rows, cols, units, cubes, use_plane, seed): (usize, usize, u32, usize, bool, u64),
) -> Result<(), TestCaseError> {
    let mut rng = DataRng::new(seed);
    let x: Vec<f64> = rng.normals(rows * cols, 0.5, 2.0).into_iter().map(|v| v as f32 as f64).collect();
    let fail = |e: dsl::Error| TestCaseError::fail(e.to_string());
    let xt = GpuTensor::<R, f32>::from_f64(dev, &x, &[rows, cols]).map_err(fail)?;
    let sums = GpuTensor::<R, f32>::full(dev, &[rows], f32::NAN).map_err(fail)?;
    let maxima = GpuTensor::<R, f32>::full(dev, &[rows], f32::NAN).map_err(fail)?;
    // Plane ops need whole planes (lavapipe's are 8 wide, CUDA's 32); the tree variant runs
    // at every width.
    let use_plane = use_plane && units.is_multiple_of(dev.info().plane_size_max.max(1));
    let cfg = CubeReduce::new(units, use_plane);
    // lavapipe silently ends an invocation's loops after 65535 iterations in all: keep the
    // work of one unit (rows per cube × columns per unit) well below that.
    let cubes = cubes.max(rows * cols.div_ceil(units as usize) / 30_000 + 1);
    row_sum_max_kernel::launch::<R>(
        dev.client(),
        CubeCount::Static(cubes.min(rows) as u32, 1, 1),
        CubeDim::new_1d(units),
        sums.as_array_arg(),
        maxima.as_array_arg(),
        xt.as_array_arg(),
        rows as u32,
        cols as u32,
        cfg,
    );
    dev.sync("row_sum_max").map_err(fail)?;
    let row = |r: usize| &x[r * cols..(r + 1) * cols];
    let want_sum: Vec<f64> = (0..rows).map(|r| row(r).iter().sum()).collect();
    let magnitude: Vec<f64> = (0..rows).map(|r| row(r).iter().map(|v| v.abs()).sum()).collect();
    let want_max: Vec<f64> = (0..rows).map(|r| row(r).iter().copied().fold(f64::MIN, f64::max)).collect();
    let what = format!("{rows}×{cols}, {cfg:?}, {cubes} cubes");
    let got_sum = sums.to_f64_vec(dev).map_err(fail)?;
    check_close_scaled(
        &format!("sum {what}"),
        &got_sum,
        &want_sum,
        &magnitude,
        &[rows],
        Tolerance::for_dtype(dsl::DType::F32),
    )
    .map_err(TestCaseError::fail)?;
    // A max involves no rounding: it must be exact.
    let got_max = maxima.to_f64_vec(dev).map_err(fail)?;
    check_close(&format!("max {what}"), &got_max, &want_max, &[rows], Tolerance { atol: 0.0, rtol: 0.0 })
        .map_err(TestCaseError::fail)?;
    Ok(())
}

fn reductions_match<R: BackendRuntime>(dev: &Device<R>) {
    let max_units = dev.info().max_units_per_cube.min(1024);
    let units = prop::sample::select(
        [1u32, 2, 8, 32, 64, 128, 256, 512, 1024].into_iter().filter(|&u| u <= max_units).collect::<Vec<_>>(),
    );
    let cols = prop_oneof![prop::sample::select(vec![1usize, 3, 17, 127, 4095, 4097]), 1usize..=5000];
    let strategy = (1usize..=40, cols, units, 1usize..=8, any::<bool>(), any::<u64>());
    run_property("cube_sum / cube_max", 48, strategy, |case| check::<R>(dev, case));
}

#[test]
fn cube_reductions_match_f64_in_both_variants() {
    on_test_backend!(reductions_match);
}
