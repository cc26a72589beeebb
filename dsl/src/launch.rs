//! Launch geometry shared by the row kernels (RMSNorm now; softmax and cross-entropy later).

use crate::backend::Device;
use crate::error::{Error, Result};
use cubecl::prelude::*;

/// How a row kernel spreads one row of `vectors` vectors over a 1-D cube: `units` units
/// (a power of two), each holding up to `slots` vectors of the row in registers, so the row is
/// read from memory once. Both are comptime: each pair is one compiled kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowLayout {
    pub units: u32,
    pub slots: u32,
}

/// Vectors per unit the layout aims for: enough independent loads in flight per unit without
/// spending many registers.
const TARGET_SLOTS: usize = 4;
/// Register slots per unit that the row kernels are compiled for at most.
pub const MAX_ROW_SLOTS: u32 = 32;

impl RowLayout {
    /// Smallest power-of-two cube (at least one warp of 32, at most 1024 units or the device
    /// limit) that covers the row with at most [`TARGET_SLOTS`] vectors per unit; slots rounded
    /// up to a power of two so few variants get compiled.
    pub fn for_row<R: Runtime>(device: &Device<R>, op: &'static str, vectors: usize) -> Result<Self> {
        let max_units = cube_units(device, 1024);
        let min_units = 32.min(max_units);
        let units = (vectors.div_ceil(TARGET_SLOTS).next_power_of_two() as u32).clamp(min_units, max_units);
        let slots = (vectors.div_ceil(units as usize).max(1).next_power_of_two()) as u32;
        if slots > MAX_ROW_SLOTS {
            return Err(Error::Unsupported {
                op,
                message: format!(
                    "a row of {vectors} vectors needs {slots} registers slots per unit with {units} units; \
                     at most {MAX_ROW_SLOTS} are compiled"
                ),
            });
        }
        Ok(Self { units, slots })
    }

    /// Whether this layout covers a row of `vectors` vectors on `device`.
    pub fn validate<R: Runtime>(&self, device: &Device<R>, op: &'static str, vectors: usize) -> Result<()> {
        let ok = self.units.is_power_of_two()
            && self.units <= device.info().max_units_per_cube
            && self.slots >= 1
            && self.slots <= MAX_ROW_SLOTS
            && (self.units as usize) * (self.slots as usize) >= vectors;
        if ok {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op,
                message: format!(
                    "layout {self:?} does not cover a row of {vectors} vectors (units must be a power \
                     of two ≤ {}, slots 1..={MAX_ROW_SLOTS}, units·slots ≥ vectors)",
                    device.info().max_units_per_cube
                ),
            })
        }
    }
}

/// Cube count and size for an elementwise kernel over `work_items` items (vectors), one item
/// per unit, grid-striding when the items outnumber the cube-count limit.
pub fn elementwise_grid<R: Runtime>(device: &Device<R>, work_items: usize) -> (CubeCount, CubeDim) {
    let units = crate::ELEMENTWISE_UNITS;
    let cubes = device.grid_cubes(work_items.div_ceil(units as usize));
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(units))
}

/// The largest power of two ≤ `wanted` that the device allows in one cube (at least 1).
pub fn cube_units<R: Runtime>(device: &Device<R>, wanted: u32) -> u32 {
    let limit = wanted.min(device.info().max_units_per_cube).max(1);
    1 << (31 - limit.leading_zeros())
}
