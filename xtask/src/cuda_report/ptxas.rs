//! Parsing `ptxas -v`: registers, spills and static shared memory of each entry function.

use anyhow::{Result, bail};

/// Resource usage of one compiled entry function, as `ptxas -v` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub function: String,
    pub registers: u32,
    pub spill_stores_bytes: u64,
    pub spill_loads_bytes: u64,
    pub stack_frame_bytes: u64,
    /// `__shared__` arrays (CubeCL declares none: its shared memory is dynamic).
    pub static_shared_bytes: u64,
}

/// The number before `unit` in `text` (`"24 registers"` → 24), if `unit` occurs.
fn number_before(text: &str, unit: &str) -> Option<u64> {
    let at = text.find(unit)?;
    text[..at].trim_end().rsplit([' ', ',', ':']).next()?.parse().ok()
}

/// Every entry function in a `ptxas -v` report (stderr), in order.
pub fn parse(report: &str) -> Result<Vec<Usage>> {
    let mut out: Vec<Usage> = Vec::new();
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(Usage { function: name.to_string(), ..Default::default() });
            continue;
        }
        let Some(current) = out.last_mut() else { continue };
        if line.contains("bytes spill stores") {
            current.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            current.spill_stores_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            current.spill_loads_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains(" registers") && line.contains("Used ") {
            let Some(registers) = number_before(line, " registers") else {
                bail!("unreadable ptxas line `{line}`");
            };
            current.registers = registers as u32;
            current.static_shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    if out.is_empty() {
        bail!("no entry function in the ptxas report:\n{report}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from ptxas 12.9 (`nvidia-cuda-nvcc-cu12==12.9.86`), `-v -arch=sm_80`, two
    /// kernels in one module, the second with shared memory and a stack frame.
    const TWO_KERNELS: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k2' for 'sm_80'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 1.791 ms
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 256 bytes cumulative stack size, 1024 bytes smem, 364 bytes cmem[0]
ptxas info    : Compile time = 49.231 ms
";

    /// Same ptxas, a kernel forced to spill with `--maxrregcount 24`.
    const SPILLS: &str = "\
ptxas info    : Overriding maximum register limit 256 for 'heavy' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'heavy' for 'sm_80'
ptxas info    : Function properties for heavy
    5960 bytes stack frame, 5952 bytes spill stores, 12152 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 5960 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compile time = 701.700 ms
";

    #[test]
    fn reads_registers_shared_memory_and_stack_per_function() {
        let usage = parse(TWO_KERNELS).unwrap();
        assert_eq!(
            usage,
            vec![
                Usage { function: "k2".into(), registers: 8, ..Default::default() },
                Usage {
                    function: "k".into(),
                    registers: 32,
                    stack_frame_bytes: 256,
                    static_shared_bytes: 1024,
                    ..Default::default()
                },
            ]
        );
    }

    #[test]
    fn reads_spill_stores_and_loads() {
        let usage = parse(SPILLS).unwrap();
        assert_eq!(usage.len(), 1);
        let u = &usage[0];
        assert_eq!((u.function.as_str(), u.registers), ("heavy", 24));
        assert_eq!((u.spill_stores_bytes, u.spill_loads_bytes, u.stack_frame_bytes), (5952, 12152, 5960));
    }

    #[test]
    fn a_report_without_functions_is_an_error() {
        let err = parse("ptxas info    : 0 bytes gmem\n").unwrap_err();
        assert!(err.to_string().contains("no entry function"), "{err}");
    }
}
