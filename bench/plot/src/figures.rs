//! The figure description `bench/report.py` writes: one TSV row per bar.
//!
//! ```text
//! figure  title  ylabel  group  series  median  min  max
//! ```
//!
//! Rows with the same `figure` make one chart; `group` is a cluster on the x axis and
//! `series` a bar (and legend entry) within each cluster. Order of first appearance is kept.
//! A header row (first field `figure`) and lines starting with `#` are skipped.

use thiserror::Error;

/// One bar: the median of the runs and their range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// One chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figure {
    /// File stem of the PNG.
    pub name: String,
    pub title: String,
    pub ylabel: String,
    pub groups: Vec<String>,
    pub series: Vec<String>,
    /// `bars[g][s]`, `None` where that group has no such series.
    pub bars: Vec<Vec<Option<Bar>>>,
}

impl Figure {
    /// Largest whisker top, for the y range.
    pub fn y_max(&self) -> f64 {
        self.bars
            .iter()
            .flatten()
            .flatten()
            .map(|b| b.max.max(b.median))
            .fold(0.0, f64::max)
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    #[error("line {line}: expected 8 tab-separated fields, found {found}")]
    Fields { line: usize, found: usize },
    #[error("line {line}: {what} '{value}' is not a finite number")]
    Number {
        line: usize,
        what: &'static str,
        value: String,
    },
    #[error("line {line}: min {min} <= median {median} <= max {max} does not hold")]
    Order {
        line: usize,
        min: f64,
        median: f64,
        max: f64,
    },
    #[error("line {line}: figure name '{name}' must be [A-Za-z0-9_-]+")]
    Name { line: usize, name: String },
    #[error("line {line}: figure '{figure}' has two rows for {group}/{series}")]
    Duplicate {
        line: usize,
        figure: String,
        group: String,
        series: String,
    },
}

fn num(line: usize, what: &'static str, v: &str) -> Result<f64, ParseError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ParseError::Number {
            line,
            what,
            value: v.to_string(),
        })
}

fn index_of(v: &mut Vec<String>, s: &str) -> usize {
    match v.iter().position(|x| x == s) {
        Some(i) => i,
        None => {
            v.push(s.to_string());
            v.len() - 1
        }
    }
}

/// Parse the whole TSV into figures, in order of first appearance.
pub fn parse(text: &str) -> Result<Vec<Figure>, ParseError> {
    let mut figs: Vec<Figure> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = raw.split('\t').collect();
        if f.len() != 8 {
            return Err(ParseError::Fields {
                line,
                found: f.len(),
            });
        }
        if f[0] == "figure" {
            continue;
        }
        if f[0].is_empty()
            || !f[0]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ParseError::Name {
                line,
                name: f[0].to_string(),
            });
        }
        let bar = Bar {
            median: num(line, "median", f[5])?,
            min: num(line, "min", f[6])?,
            max: num(line, "max", f[7])?,
        };
        if !(bar.min <= bar.median && bar.median <= bar.max) {
            return Err(ParseError::Order {
                line,
                min: bar.min,
                median: bar.median,
                max: bar.max,
            });
        }
        let fi = match figs.iter().position(|x| x.name == f[0]) {
            Some(fi) => fi,
            None => {
                figs.push(Figure {
                    name: f[0].to_string(),
                    title: f[1].to_string(),
                    ylabel: f[2].to_string(),
                    ..Figure::default()
                });
                figs.len() - 1
            }
        };
        let fig = &mut figs[fi];
        let g = index_of(&mut fig.groups, f[3]);
        let s = index_of(&mut fig.series, f[4]);
        while fig.bars.len() < fig.groups.len() {
            fig.bars.push(Vec::new());
        }
        let row = &mut fig.bars[g];
        if row.len() <= s {
            row.resize(s + 1, None);
        }
        if row[s].is_some() {
            return Err(ParseError::Duplicate {
                line,
                figure: f[0].to_string(),
                group: f[3].to_string(),
                series: f[4].to_string(),
            });
        }
        row[s] = Some(bar);
    }
    // Every row as wide as the series list, so renderers index without checks failing.
    for fig in &mut figs {
        let n = fig.series.len();
        for row in &mut fig.bars {
            row.resize(n, None);
        }
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "figure\ttitle\tylabel\tgroup\tseries\tmedian\tmin\tmax\n\
        # comment\n\
        blk\tBlock\tIOPS\tqd1\tours\t10\t9\t12\n\
        blk\tBlock\tIOPS\tqd1\tqemu\t8\t7\t8\n\
        blk\tBlock\tIOPS\tqd32\tqemu\t80\t70\t90\n\
        net\tNet\tGbit/s\ttx\tours\t1.5\t1\t2\n";

    #[test]
    fn groups_series_and_holes() {
        let f = parse(T).unwrap();
        assert_eq!(f.len(), 2);
        let b = &f[0];
        assert_eq!(b.groups, ["qd1", "qd32"]);
        assert_eq!(b.series, ["ours", "qemu"]);
        // qd32 has no "ours" bar: a hole, and the row is as wide as the series list.
        assert_eq!(b.bars[1].len(), 2);
        assert!(b.bars[1][0].is_none());
        assert_eq!(b.bars[1][1].unwrap().median, 80.0);
        assert_eq!(b.y_max(), 90.0);
        assert_eq!(f[1].ylabel, "Gbit/s");
    }

    #[test]
    fn rejects_bad_rows() {
        assert_eq!(
            parse("a\tb\tc\n"),
            Err(ParseError::Fields { line: 1, found: 3 })
        );
        assert!(matches!(
            parse("a\tt\ty\tg\ts\tNaN\t1\t2\n"),
            Err(ParseError::Number { what: "median", .. })
        ));
        assert!(matches!(
            parse("a\tt\ty\tg\ts\t5\t6\t7\n"),
            Err(ParseError::Order { .. })
        ));
        assert!(matches!(
            parse("../x\tt\ty\tg\ts\t1\t1\t1\n"),
            Err(ParseError::Name { .. })
        ));
        assert!(matches!(
            parse("a\tt\ty\tg\ts\t1\t1\t1\na\tt\ty\tg\ts\t2\t2\t2\n"),
            Err(ParseError::Duplicate { line: 2, .. })
        ));
    }
}
