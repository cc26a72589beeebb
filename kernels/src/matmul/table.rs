//! Measured routine choices for one device: `cargo xtask tune-matmul` times every routine the
//! device offers on a model's GEMM shapes and writes a [`MatmulTable`] (JSON); runs load it
//! into the device's [`dsl::KernelPolicy`] and [`super::choose`] reads it.
//!
//! A product whose shape the table holds runs the routine measured fastest for it. Any other
//! product runs the routine of the nearest measured shape of the same kind (same transposes,
//! element types, accumulation and TF32 setting; nearest by Σ |ln(a/b)| over m, n and k),
//! because the fastest routine changes slowly with size; with no entry of its kind it runs the
//! default. Every routine computes the same product, so a table changes speed, not results
//! beyond f32 summation order.

use super::MatmulRoutine;
use dsl::DType;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// What a product's choice depends on: `out[m, n] = lhs[m, k]·rhs[k, n] (+ out)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `lhs` is a row-major `[k, m]` buffer read transposed (the weight gradient's `dyᵀ`).
    pub lhs_transposed: bool,
    /// `rhs` is a row-major `[n, k]` buffer read transposed (the forward's `wᵀ`).
    pub rhs_transposed: bool,
    /// Element type of `lhs` and `rhs`.
    pub dtype: DType,
    pub out_dtype: DType,
    pub accumulate: bool,
    /// f32 inputs allowed onto TF32 tensor cores.
    pub tf32: bool,
}

impl MatmulKey {
    /// Same transposes, element types, accumulation and TF32 setting: `other`'s routine is one
    /// this product may take.
    fn same_kind(&self, other: &Self) -> bool {
        (self.lhs_transposed, self.rhs_transposed, self.dtype, self.out_dtype, self.accumulate, self.tf32)
            == (
                other.lhs_transposed,
                other.rhs_transposed,
                other.dtype,
                other.out_dtype,
                other.accumulate,
                other.tf32,
            )
    }

    /// Σ |ln(a/b)| over m, n, k: 0 for the same shape, ln 2 per dimension twice as large.
    fn distance(&self, other: &Self) -> f64 {
        let d = |a: usize, b: usize| ((a.max(1) as f64) / (b.max(1) as f64)).ln().abs();
        d(self.m, other.m) + d(self.n, other.n) + d(self.k, other.k)
    }

    /// Floating-point operations of the product (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

impl fmt::Display for MatmulKey {
    /// `[m×k]·[k×n]` with each transposed operand as stored, then `ᵀ`: the forward
    /// `[N×in]·[out×in]ᵀ`, the weight gradient `[N×out]ᵀ·[N×in]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let operand = |rows: usize, cols: usize, transposed: bool| {
            if transposed { format!("[{cols}x{rows}]ᵀ") } else { format!("[{rows}x{cols}]") }
        };
        write!(
            f,
            "{}·{} {}→{}{}{}",
            operand(self.m, self.k, self.lhs_transposed),
            operand(self.k, self.n, self.rhs_transposed),
            self.dtype,
            self.out_dtype,
            if self.accumulate { " +=" } else { "" },
            if self.tf32 { " tf32" } else { "" }
        )
    }
}

/// One routine's time on an entry's product.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoutineTiming {
    pub routine: String,
    /// Median over the timed repetitions; `None` where the routine could not run the product
    /// (`note` says why).
    pub median_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// One measured product: its key, the fastest routine, and every routine's time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MatmulEntry {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs_transposed: bool,
    pub rhs_transposed: bool,
    pub dtype: String,
    pub out_dtype: String,
    pub accumulate: bool,
    pub tf32: bool,
    /// What the product is in the model (`layer.mlp.up forward`, …), for people reading it.
    #[serde(default)]
    pub what: String,
    /// The routine measured fastest ([`MatmulRoutine::name`]).
    pub routine: String,
    pub timings: Vec<RoutineTiming>,
}

impl MatmulEntry {
    /// An entry for `key` choosing `routine`.
    pub fn new(key: &MatmulKey, what: String, routine: MatmulRoutine, timings: Vec<RoutineTiming>) -> Self {
        Self {
            m: key.m,
            n: key.n,
            k: key.k,
            lhs_transposed: key.lhs_transposed,
            rhs_transposed: key.rhs_transposed,
            dtype: key.dtype.to_string(),
            out_dtype: key.out_dtype.to_string(),
            accumulate: key.accumulate,
            tf32: key.tf32,
            what,
            routine: routine.name().to_string(),
            timings,
        }
    }

    fn parse(&self) -> Result<(MatmulKey, MatmulRoutine), String> {
        let routine = MatmulRoutine::from_name(&self.routine).ok_or_else(|| {
            let known: Vec<_> = MatmulRoutine::ALL.iter().map(|r| r.name()).collect();
            format!("unknown routine `{}` (known: {})", self.routine, known.join(", "))
        })?;
        let key = MatmulKey {
            m: self.m,
            n: self.n,
            k: self.k,
            lhs_transposed: self.lhs_transposed,
            rhs_transposed: self.rhs_transposed,
            dtype: self.dtype.parse()?,
            out_dtype: self.out_dtype.parse()?,
            accumulate: self.accumulate,
            tf32: self.tf32,
        };
        Ok((key, routine))
    }
}

/// A table of measured routine choices for one device (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MatmulTable {
    /// [`dsl::DeviceInfo::signature`] of the device it was measured on: a run loads only a
    /// table measured on a device like its own.
    pub device: String,
    /// How and when it was measured (free text: command, date, repetitions).
    pub measured_by: String,
    pub entries: Vec<MatmulEntry>,
    #[serde(skip)]
    parsed: Vec<(MatmulKey, MatmulRoutine)>,
}

/// A table that cannot be read or used.
#[derive(Debug, thiserror::Error)]
#[error("matmul table {source_name}: {message}")]
pub struct TableError {
    /// The file (or other source) read.
    pub source_name: String,
    pub message: String,
}

impl MatmulTable {
    /// An empty table for the device with signature `device`.
    pub fn new(device: String, measured_by: String) -> Self {
        Self { device, measured_by, entries: Vec::new(), parsed: Vec::new() }
    }

    /// Adds `entry`, replacing an entry for the same product (checked as [`Self::from_json`]
    /// checks entries).
    pub fn insert(&mut self, entry: MatmulEntry) -> Result<(), TableError> {
        let parsed =
            entry.parse().map_err(|message| TableError { source_name: "(new entry)".into(), message })?;
        match self.parsed.iter().position(|(key, _)| *key == parsed.0) {
            Some(i) => {
                self.entries[i] = entry;
                self.parsed[i] = parsed;
            }
            None => {
                self.entries.push(entry);
                self.parsed.push(parsed);
            }
        }
        Ok(())
    }

    /// Parses a table; `source_name` names it in errors. Every entry's routine and element
    /// types must be known: an error names the entry (0-based) and the bad value.
    pub fn from_json(text: &str, source_name: &str) -> Result<Self, TableError> {
        let error = |message: String| TableError { source_name: source_name.to_string(), message };
        let mut table: Self = serde_json::from_str(text).map_err(|e| error(e.to_string()))?;
        table.parsed = table
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| e.parse().map_err(|m| error(format!("entry {i} ({}): {m}", e.what))))
            .collect::<Result<_, _>>()?;
        Ok(table)
    }

    /// Reads and parses the table at `path`.
    pub fn load(path: &Path) -> Result<Self, TableError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| TableError { source_name: name.clone(), message: e.to_string() })?;
        Self::from_json(&text, &name)
    }

    /// The table as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a table of strings and numbers serialises")
    }

    /// The measured routine for `key`'s shape, else that of the nearest measured shape of the
    /// same kind; `None` when the table has no entry of that kind.
    pub fn choose(&self, key: &MatmulKey) -> Option<MatmulRoutine> {
        self.parsed
            .iter()
            .filter(|(k, _)| k.same_kind(key))
            .min_by(|(a, _), (b, _)| key.distance(a).total_cmp(&key.distance(b)))
            .map(|&(_, routine)| routine)
    }

    /// Number of measured products.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(m: usize, n: usize, k: usize) -> MatmulKey {
        MatmulKey {
            m,
            n,
            k,
            lhs_transposed: false,
            rhs_transposed: true,
            dtype: DType::BF16,
            out_dtype: DType::BF16,
            accumulate: false,
            tf32: false,
        }
    }

    fn table() -> MatmulTable {
        let mut table = MatmulTable::new("test device".into(), "test".into());
        for (k, routine) in [
            (key(16384, 4096, 4096), MatmulRoutine::DoubleMma),
            (key(16384, 11008, 4096), MatmulRoutine::SpecializedMma),
            (key(64, 64, 64), MatmulRoutine::SimpleCmma),
        ] {
            table.insert(MatmulEntry::new(&k, String::new(), routine, Vec::new())).unwrap();
        }
        table
    }

    #[test]
    fn exact_then_nearest_shape_of_the_same_kind() {
        let table = table();
        assert_eq!(table.choose(&key(16384, 11008, 4096)), Some(MatmulRoutine::SpecializedMma));
        assert_eq!(table.choose(&key(16384, 4096, 4096)), Some(MatmulRoutine::DoubleMma));
        // 8192×4096×4096 is one halving from the first entry, further from the others.
        assert_eq!(table.choose(&key(8192, 4096, 4096)), Some(MatmulRoutine::DoubleMma));
        assert_eq!(table.choose(&key(100, 50, 80)), Some(MatmulRoutine::SimpleCmma));
        // Another kind (accumulating) has no entry.
        assert_eq!(table.choose(&MatmulKey { accumulate: true, ..key(16384, 4096, 4096) }), None);
        assert_eq!(table.choose(&MatmulKey { dtype: DType::F16, ..key(16384, 4096, 4096) }), None);
    }

    #[test]
    fn keys_print_operands_as_stored() {
        assert_eq!(key(16384, 11008, 4096).to_string(), "[16384x4096]·[11008x4096]ᵀ bf16→bf16");
        let dw = MatmulKey {
            lhs_transposed: true,
            rhs_transposed: false,
            out_dtype: DType::F32,
            accumulate: true,
            ..key(11008, 4096, 16384)
        };
        assert_eq!(dw.to_string(), "[16384x11008]ᵀ·[16384x4096] bf16→f32 +=");
    }

    #[test]
    fn insert_replaces_the_same_product() {
        let mut table = table();
        let k = key(64, 64, 64);
        table.insert(MatmulEntry::new(&k, String::new(), MatmulRoutine::DoubleUnit, Vec::new())).unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(table.choose(&k), Some(MatmulRoutine::DoubleUnit));
    }

    #[test]
    fn round_trips_through_json() {
        let table = table();
        let back = MatmulTable::from_json(&table.to_json(), "memory").unwrap();
        assert_eq!(back.choose(&key(16384, 11008, 4096)), Some(MatmulRoutine::SpecializedMma));
        assert_eq!(back, table);
    }

    #[test]
    fn bad_entries_are_named() {
        let mut json: serde_json::Value = serde_json::from_str(&table().to_json()).unwrap();
        json["entries"][1]["routine"] = "fast_mma".into();
        json["entries"][1]["what"] = "mlp.up forward".into();
        let err = MatmulTable::from_json(&json.to_string(), "t.json").unwrap_err().to_string();
        assert!(
            err.starts_with("matmul table t.json: entry 1 (mlp.up forward): unknown routine `fast_mma`"),
            "{err}"
        );
        json["entries"][1]["routine"] = "double_mma".into();
        json["entries"][0]["dtype"] = "f8".into();
        let err = MatmulTable::from_json(&json.to_string(), "t.json").unwrap_err().to_string();
        assert!(err.contains("entry 0 (): unknown element type `f8`"), "{err}");
        let err = MatmulTable::from_json("{", "t.json").unwrap_err().to_string();
        assert!(err.starts_with("matmul table t.json: EOF"), "{err}");
    }
}
