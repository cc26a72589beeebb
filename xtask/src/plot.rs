//! The PNG of a run's loss curves, drawn from its JSON-lines log (so a resumed run's plot shows
//! the whole history). Text needs a TrueType font: the first of a few usual system fonts found
//! is used (plotters renders it in pure Rust); without one there is no plot, and the caller
//! says why.

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The family name the registered font is drawn under.
pub(crate) const FONT_FAMILY: &str = "sans-serif";

/// Usual places of a sans-serif TrueType font (Debian/Ubuntu, Fedora, Arch, macOS, Windows).
const FONT_CANDIDATES: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font with plotters once; the path used, or why none.
pub(crate) fn font() -> Result<&'static Path, String> {
    static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FONT.get_or_init(|| {
        for candidate in FONT_CANDIDATES.iter().map(Path::new) {
            let Ok(bytes) = std::fs::read(candidate) else { continue };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                return Ok(candidate.to_path_buf());
            }
        }
        Err("no TrueType font found (install fonts-dejavu-core or similar)".into())
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(Clone::clone)
}

/// (step, loss) points of one curve.
type Curve = Vec<(f64, f64)>;

/// Training loss per step and validation loss per evaluation, from a log's lines.
fn read_log(log: &Path) -> Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = entry["step"].as_f64() else { continue };
        if let Some(loss) = entry["loss"].as_f64() {
            // The log's step is 0-indexed and the loss is measured before that step's update.
            train.push((step + 1.0, loss));
        }
        if let Some(loss) = entry["val_loss"].as_f64() {
            val.push((step, loss));
        }
    }
    Ok((train, val))
}

/// Draws `log`'s training and validation losses against the step into `png`.
pub fn loss_curves(log: &Path, png: &Path) -> Result<()> {
    let (train, val) = read_log(log)?;
    if train.is_empty() {
        bail!("{} has no training steps", log.display());
    }
    font().map_err(anyhow::Error::msg)?;
    let all = train.iter().chain(&val);
    let last_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let finite = || all.clone().map(|p| p.1).filter(|v| v.is_finite());
    let (low, high) = (finite().fold(f64::INFINITY, f64::min), finite().fold(f64::NEG_INFINITY, f64::max));
    let margin = ((high - low) * 0.05).max(1e-3);

    let root = BitMapBackend::new(png, (960, 540)).into_drawing_area();
    let draw_error = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", png.display());
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", (FONT_FAMILY, 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last_step, (low - margin)..(high + margin))
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("cross-entropy (nats)")
        .label_style((FONT_FAMILY, 14))
        .draw()
        .map_err(|e| draw_error(&e))?;
    let train_color = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(train.iter().copied(), train_color.stroke_width(2)))
        .map_err(|e| draw_error(&e))?
        .label("training")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], train_color.stroke_width(2)));
    if !val.is_empty() {
        let val_color = RGBColor(255, 127, 14);
        chart
            .draw_series(LineSeries::new(val.iter().copied(), val_color.stroke_width(2)))
            .map_err(|e| draw_error(&e))?
            .label("validation")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], val_color.stroke_width(2)));
        chart
            .draw_series(val.iter().map(|&p| Circle::new(p, 4, val_color.filled())))
            .map_err(|e| draw_error(&e))?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT_FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}
