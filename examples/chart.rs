//! Draws τ and speedup against beam width from `benchmark --out` JSON reports, as SVG.
//!
//! ```text
//! cargo run --release --example chart -- --out-dir docs/img tau.json speed.json
//! ```
//! One series per (backend, dtype, beam length, temperature, prompt count, batch size) found in
//! the reports. Writes
//! `tau_vs_beam_width.svg` and, when any report has an AR baseline, `speedup_vs_beam_width.svg`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use plotters::prelude::*;

#[derive(Parser, Debug)]
struct Args {
    /// Benchmark reports (`benchmark --out FILE`).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    #[arg(long, default_value = "docs/img")]
    out_dir: PathBuf,
}

/// Points of one series, keyed by beam width.
type Series = BTreeMap<String, BTreeMap<u64, f64>>;

fn main() -> Result<()> {
    let args = Args::parse();
    let mut tau = Series::new();
    let mut speedup = Series::new();
    for path in &args.reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let device = report["device"].as_str().unwrap_or("?");
        let dtype = report["dtype"].as_str().unwrap_or("?");
        let prompts = report["prompts"].as_u64().unwrap_or(0);
        let batch = report["batch_size"].as_u64().unwrap_or(1);
        let Some(results) = report["results"].as_array() else {
            bail!("{} has no `results` list", path.display());
        };
        for result in results {
            let width = result["beam_width"].as_u64().unwrap_or(0);
            if width == 0 {
                continue; // the AR baseline
            }
            let label = format!(
                "{device} {dtype}, C={}, T={}, {prompts} prompts, batch {batch}",
                result["beam_length"].as_u64().unwrap_or(0),
                result["temperature"].as_f64().unwrap_or(0.0)
            );
            if let Some(t) = result["tau"].as_f64() {
                tau.entry(label.clone()).or_default().insert(width, t);
            }
            if let Some(s) = result["speedup_over_ar"].as_f64() {
                speedup.entry(label).or_default().insert(width, s);
            }
        }
    }
    std::fs::create_dir_all(&args.out_dir)?;
    let tau_path = args.out_dir.join("tau_vs_beam_width.svg");
    draw(
        &tau_path,
        "τ (tokens per target forward) vs beam width",
        "τ",
        &tau,
    )?;
    eprintln!("wrote {}", tau_path.display());
    if !speedup.is_empty() {
        let path = args.out_dir.join("speedup_vs_beam_width.svg");
        draw(&path, "speedup over AR vs beam width", "speedup", &speedup)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn draw(path: &Path, title: &str, y_label: &str, series: &Series) -> Result<()> {
    let points = series.values().flat_map(|s| s.iter());
    let (max_width, max_y) = points.fold((1u64, 1.0f64), |(w, y), (&x, &v)| (w.max(x), y.max(v)));
    // Beam widths are powers of two: a log2 axis spaces them evenly.
    let x_max = (max_width as f64).log2().ceil().max(1.0);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.2f64..x_max + 0.2, 0.0f64..(max_y * 1.15))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("beam width M")
        .y_desc(y_label)
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| format!("{}", 2f64.powf(x.round()) as u64))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|(&w, &v)| ((w as f64).log2(), v))
            .collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(xy.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}
