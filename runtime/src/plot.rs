//! `--plot FILE`: an SVG of accuracy and per-layer density over epochs, written by hand (no
//! system libraries, no fonts to embed: the viewer renders the text).

use std::fmt::Write as _;

use crate::metrics::EpochMetrics;

const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 300.0;
const TOP: f64 = 60.0;
/// The left edge of the accuracy panel (room for its tick labels and axis title).
const LEFT: f64 = 80.0;
/// Between the panels, and right of the density panel (half its last tick label, and air).
const GAP: f64 = 80.0;
const W: f64 = LEFT + PANEL_W + GAP + PANEL_W + 40.0;
/// The first legend row's baseline, below the axis titles.
const LEGEND_Y: f64 = TOP + PANEL_H + 60.0;
/// Legend rows are this far apart; each row of the density legend holds
/// [`LEGEND_PER_ROW`] layers.
const LEGEND_ROW: f64 = 18.0;
const LEGEND_PER_ROW: usize = 4;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

struct Panel {
    x0: f64,
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        let span = (self.x_max - self.x_min).max(1e-9);
        self.x0 + (x - self.x_min) / span * PANEL_W
    }
    fn py(&self, y: f64) -> f64 {
        let span = (self.y_max - self.y_min).max(1e-9);
        TOP + PANEL_H - (y - self.y_min) / span * PANEL_H
    }

    fn axes(&self, svg: &mut String, title: &str, y_label: &str, percent: bool) {
        let (x0, y0) = (self.x0, TOP + PANEL_H);
        let _ = writeln!(
            svg,
            r##"<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="16" font-weight="bold">{title}</text>"##,
            x0 + PANEL_W / 2.0,
            TOP - 20.0
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="13">epoch</text>"##,
            x0 + PANEL_W / 2.0,
            y0 + 38.0
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="13" transform="rotate(-90 {} {})">{y_label}</text>"##,
            x0 - 48.0,
            TOP + PANEL_H / 2.0,
            x0 - 48.0,
            TOP + PANEL_H / 2.0
        );
        for i in 0..=5 {
            let y = self.y_min + (self.y_max - self.y_min) * i as f64 / 5.0;
            let py = self.py(y);
            let label = if percent {
                format!("{:.1}%", y * 100.0)
            } else {
                format!("{y:.2}")
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{label}</text>"##,
                x0 + PANEL_W,
                x0 - 6.0,
                py + 4.0
            );
        }
        let span = (self.x_max - self.x_min).max(1.0);
        let step = (span / 10.0).ceil().max(1.0);
        let mut x = self.x_min;
        while x <= self.x_max + 1e-9 {
            let px = self.px(x);
            let _ = writeln!(
                svg,
                r##"<text x="{px:.1}" y="{}" text-anchor="middle" font-size="11">{x}</text>"##,
                y0 + 16.0
            );
            x += step;
        }
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            return;
        }
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
            path.join(" ")
        );
        for &(x, y) in points {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"##,
                self.px(x),
                self.py(y)
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document for a run's metrics (`title` goes on top).
pub fn svg(title: &str, history: &[EpochMetrics]) -> String {
    let names: Vec<String> = history
        .first()
        .map(|m| m.layers.iter().map(|l| l.name.clone()).collect())
        .unwrap_or_default();
    let legend_rows = names.len().div_ceil(LEGEND_PER_ROW).max(1);
    let h = LEGEND_Y + LEGEND_ROW * (legend_rows - 1) as f64 + 16.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"##,
        W / 2.0,
        escape(title)
    );
    let x_max = history.last().map_or(1.0, |m| m.epoch as f64).max(1.0);
    let x_min = history.first().map_or(1.0, |m| m.epoch as f64).min(x_max);

    // Accuracy.
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.val_acc.map(|a| (m.epoch as f64, a)))
        .collect();
    let test: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.test_acc.map(|a| (m.epoch as f64, a)))
        .collect();
    let lowest = val.iter().chain(&test).map(|p| p.1).fold(1.0f64, f64::min);
    let y_min = ((lowest - 0.005) * 100.0).floor() / 100.0;
    let acc = Panel {
        x0: LEFT,
        x_min,
        x_max,
        y_min: y_min.clamp(0.0, 0.99),
        y_max: 1.0,
    };
    acc.axes(&mut svg, "Accuracy", "accuracy", true);
    acc.line(&mut svg, &val, COLORS[0]);
    for &(x, y) in &test {
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{}"/>"##,
            acc.px(x) - 4.0,
            acc.py(y) - 4.0,
            COLORS[1]
        );
    }
    let legend_y = LEGEND_Y;
    let _ = writeln!(
        svg,
        r##"<line x1="90" y1="{legend_y}" x2="110" y2="{legend_y}" stroke="{}" stroke-width="2"/><text x="115" y="{}" font-size="12">validation</text><rect x="200" y="{}" width="8" height="8" fill="{}"/><text x="213" y="{}" font-size="12">test {}</text>"##,
        COLORS[0],
        legend_y + 4.0,
        legend_y - 4.0,
        COLORS[1],
        legend_y + 4.0,
        test.last()
            .map_or(String::new(), |t| format!("{:.2}%", t.1 * 100.0))
    );

    // Density per layer.
    let dens = Panel {
        x0: LEFT + PANEL_W + GAP,
        x_min,
        x_max,
        y_min: 0.0,
        y_max: 1.0,
    };
    dens.axes(&mut svg, "Density per layer", "density", true);
    for (i, name) in names.iter().enumerate() {
        let points: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|m| {
                m.layers
                    .iter()
                    .find(|l| &l.name == name)
                    .map(|l| (m.epoch as f64, l.density))
            })
            .collect();
        let color = COLORS[i % COLORS.len()];
        dens.line(&mut svg, &points, color);
        let lx = dens.x0 + 10.0 + 95.0 * (i % LEGEND_PER_ROW) as f64;
        let ly = legend_y + LEGEND_ROW * (i / LEGEND_PER_ROW) as f64;
        let _ = writeln!(
            svg,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}" font-size="12">{}</text>"##,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LayerMetrics, METRICS_VERSION};

    fn history(epochs: u32, layers: &[&str]) -> Vec<EpochMetrics> {
        (1..=epochs)
            .map(|e| EpochMetrics {
                version: METRICS_VERSION,
                epoch: e,
                train_loss: 0.1,
                val_acc: Some(0.9 + e as f64 / 100.0),
                test_acc: (e == epochs).then_some(0.95),
                lr: 0.1,
                prune_rate: 0.5,
                epoch_seconds: 1.0,
                step_ms_median: 0.1,
                compile_ms: 0.0,
                nnz_total: 10,
                flops_fraction: None,
                layers: layers
                    .iter()
                    .map(|n| LayerMetrics {
                        name: n.to_string(),
                        nnz: 5,
                        density: 0.05 * e as f64,
                        strategies: Default::default(),
                    })
                    .collect(),
                steps: e as u64,
                val_loss: None,
                dense_steps: 0,
                update_ms: 0.0,
                mask_updated: true,
                comm_bytes: None,
                comm_bytes_dense_equivalent: None,
            })
            .collect()
    }

    #[test]
    fn draws_every_layer_and_point() {
        let s = svg("run <1>", &history(3, &["fc1", "fc<2>"]));
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 3, "validation + 2 layers");
        assert_eq!(s.matches("<circle").count(), 9);
        assert!(s.contains("fc&lt;2&gt;") && s.contains("run &lt;1&gt;"));
        assert!(s.contains("test 95.00%"));
    }

    /// Every label lies inside the picture (its width estimated at 0.6 em a character): the
    /// legend below the panels, the last epoch's tick label at the right edge (11 epochs), the
    /// tick labels left of the accuracy panel; for one epoch, a hundred, and nine layers.
    #[test]
    fn no_text_is_clipped() {
        let attr = |tag: &str, name: &str| -> Option<f64> {
            let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            tag[at..].split('"').next()?.parse().ok()
        };
        let wrn = [
            "conv1", "b1.conv1", "b1.conv2", "b2.conv1", "b2.conv2", "b3.conv1", "b3.conv2",
            "shortcut", "fc",
        ];
        for (epochs, layers) in [
            (1, &["fc1"][..]),
            (11, &["fc1", "fc2", "fc3"]),
            (100, &["conv1", "conv2", "fc1", "fc2"]),
            (250, &wrn),
        ] {
            let s = svg(
                "lenet5 at density 0.05 (window:64, seed 17)",
                &history(epochs, layers),
            );
            let head = &s[..s.find('>').unwrap()];
            let (w, h) = (attr(head, "width").unwrap(), attr(head, "height").unwrap());
            for part in s.split("<text").skip(1) {
                let tag = &part[..part.find('>').unwrap()];
                let text = &part[part.find('>').unwrap() + 1..part.find("</text>").unwrap()];
                if tag.contains("rotate") {
                    continue; // the y-axis titles, placed by their centre
                }
                let (x, y, size) = (
                    attr(tag, "x").unwrap(),
                    attr(tag, "y").unwrap(),
                    attr(tag, "font-size").unwrap(),
                );
                let width = 0.6 * size * text.chars().count() as f64;
                let (left, right) = if tag.contains("text-anchor=\"middle\"") {
                    (x - width / 2.0, x + width / 2.0)
                } else if tag.contains("text-anchor=\"end\"") {
                    (x - width, x)
                } else {
                    (x, x + width)
                };
                assert!(
                    left >= 0.0 && right <= w && y - size >= 0.0 && y + 0.3 * size <= h,
                    "{epochs} epochs, {} layers: {text:?} at ({x}, {y}) leaves the {w}x{h} picture",
                    layers.len()
                );
            }
        }
    }
}
