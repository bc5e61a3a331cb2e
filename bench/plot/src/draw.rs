//! Renders one [`Figure`] as a grouped bar chart: the bar is the median, the whisker runs
//! from min to max. Laid out in pixels on plotters' bitmap backend (no coordinate system
//! magic), so labels land where the code says.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use thiserror::Error;

use crate::figures::Figure;

#[derive(Debug, Error)]
pub enum DrawError {
    #[error("embedded font rejected")]
    Font,
    #[error("drawing {path}: {msg}")]
    Backend { path: String, msg: String },
}

/// Bar colours, one per series (Okabe-Ito, readable for colour-blind readers).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
];

const HEIGHT: u32 = 480;
const LEFT: i32 = 90;
const RIGHT: i32 = 20;
const TOP: i32 = 50;
const BOTTOM: i32 = 60;
const BAR_W: i32 = 26;

/// Register the embedded DejaVu Sans as "sans-serif". Call once before drawing.
pub fn init_font() -> Result<(), DrawError> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| DrawError::Font)
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about five ticks up to `max`.
pub fn tick_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let k = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * p
}

/// Tick label: no needless decimals, thousands as "k".
pub fn tick_label(v: f64, step: f64) -> String {
    if step >= 1000.0 && v.abs() >= 1000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round() as i64)
        } else {
            format!("{k:.1}k")
        }
    } else if step >= 1.0 {
        format!("{}", v.round() as i64)
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

/// Image width for a figure: wide enough for every bar and group label.
pub fn width_for(fig: &Figure) -> u32 {
    let slot = group_width(fig);
    let w = LEFT + RIGHT + slot * fig.groups.len() as i32;
    w.clamp(640, 4000) as u32
}

fn group_width(fig: &Figure) -> i32 {
    let bars = BAR_W * fig.series.len().max(1) as i32 + 24;
    let label = fig
        .groups
        .iter()
        .map(|g| g.chars().count() as i32 * 8 + 16)
        .max()
        .unwrap_or(0);
    bars.max(label)
}

/// Draw `fig` into `path` (PNG).
pub fn draw(fig: &Figure, path: &Path) -> Result<(), DrawError> {
    let be = |e: &dyn std::fmt::Display| DrawError::Backend {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let w = width_for(fig);
    let root = BitMapBackend::new(path, (w, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| be(&e))?;
    let font = |size: f64| ("sans-serif", size).into_font();
    let black = font(14.0).color(&BLACK);

    let plot_l = LEFT;
    let plot_r = w as i32 - RIGHT;
    let plot_t = TOP;
    let plot_b = HEIGHT as i32 - BOTTOM;
    let y_max_val = fig.y_max();
    let step = tick_step(y_max_val * 1.05);
    let ticks = ((y_max_val * 1.05) / step).ceil().max(1.0) as i32;
    let y_top = step * f64::from(ticks);
    let y_px = |v: f64| plot_b - ((v / y_top) * f64::from(plot_b - plot_t)).round() as i32;

    root.draw_text(&fig.title, &font(18.0).color(&BLACK), (plot_l, 12))
        .map_err(|e| be(&e))?;
    // Y label, rotated.
    let ylab = font(14.0).transform(FontTransform::Rotate270).color(&BLACK);
    root.draw_text(&fig.ylabel, &ylab, (12, (plot_t + plot_b) / 2 + 40))
        .map_err(|e| be(&e))?;
    // Grid and ticks.
    for i in 0..=ticks {
        let v = step * f64::from(i);
        let y = y_px(v);
        let grid = if i == 0 {
            BLACK
        } else {
            RGBColor(220, 220, 220)
        };
        root.draw(&PathElement::new(vec![(plot_l, y), (plot_r, y)], grid))
            .map_err(|e| be(&e))?;
        let label = tick_label(v, step);
        let tw = label.chars().count() as i32 * 8;
        root.draw_text(&label, &font(12.0).color(&BLACK), (plot_l - 8 - tw, y - 7))
            .map_err(|e| be(&e))?;
    }
    root.draw(&PathElement::new(
        vec![(plot_l, plot_t), (plot_l, plot_b)],
        BLACK,
    ))
    .map_err(|e| be(&e))?;

    // Bars.
    let gw = group_width(fig);
    let n = fig.series.len().max(1) as i32;
    for (gi, g) in fig.groups.iter().enumerate() {
        let g0 = plot_l + gw * gi as i32;
        let bars_l = g0 + (gw - BAR_W * n) / 2;
        for (si, bar) in fig.bars[gi].iter().enumerate() {
            let Some(b) = bar else { continue };
            let c = PALETTE[si % PALETTE.len()];
            let x0 = bars_l + BAR_W * si as i32 + 2;
            let x1 = x0 + BAR_W - 4;
            root.draw(&Rectangle::new(
                [(x0, y_px(b.median)), (x1, plot_b)],
                c.filled(),
            ))
            .map_err(|e| be(&e))?;
            let xm = (x0 + x1) / 2;
            let (ylo, yhi) = (y_px(b.min), y_px(b.max));
            for seg in [
                vec![(xm, ylo), (xm, yhi)],
                vec![(xm - 5, ylo), (xm + 5, ylo)],
                vec![(xm - 5, yhi), (xm + 5, yhi)],
            ] {
                root.draw(&PathElement::new(seg, BLACK.stroke_width(2)))
                    .map_err(|e| be(&e))?;
            }
        }
        let tw = g.chars().count() as i32 * 7;
        root.draw_text(g, &black, (g0 + (gw - tw) / 2, plot_b + 8))
            .map_err(|e| be(&e))?;
    }

    // Legend, one row under the axis labels.
    let mut x = plot_l;
    let y = HEIGHT as i32 - 26;
    for (si, s) in fig.series.iter().enumerate() {
        let c = PALETTE[si % PALETTE.len()];
        root.draw(&Rectangle::new([(x, y), (x + 14, y + 14)], c.filled()))
            .map_err(|e| be(&e))?;
        root.draw_text(s, &black, (x + 20, y)).map_err(|e| be(&e))?;
        x += 20 + s.chars().count() as i32 * 8 + 24;
    }
    root.draw_text(
        "bar: median, whisker: min-max",
        &font(12.0).color(&RGBColor(90, 90, 90)),
        (plot_r - 200, 18),
    )
    .map_err(|e| be(&e))?;
    root.present().map_err(|e| be(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figures::parse;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(12_000.0), 5000.0);
        assert_eq!(tick_step(0.9), 0.2);
        assert_eq!(tick_step(0.0), 1.0);
        assert_eq!(tick_label(15_000.0, 5000.0), "15k");
        assert_eq!(tick_label(2500.0, 2500.0), "2.5k");
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(40.0, 20.0), "40");
    }

    #[test]
    fn draws_a_png() {
        init_font().unwrap();
        let f = parse("blk\tBlock IOPS\tIOPS\tqd1\tours\t10\t9\t12\nblk\tBlock IOPS\tIOPS\tqd1\tqemu\t8\t7\t8\n")
            .unwrap();
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("blk.png");
        draw(&f[0], &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Width and height from the IHDR chunk.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (width_for(&f[0]), HEIGHT));
    }
}
