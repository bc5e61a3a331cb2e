//! `bench-plot FIGURES.tsv OUTDIR`: one PNG per figure of the benchmark report (see
//! `figures.rs` for the input format). `bench/report.py` writes the TSV.

mod draw;
mod figures;

use std::path::PathBuf;
use std::process::ExitCode;

fn run() -> Result<usize, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out] = args.as_slice() else {
        return Err("usage: bench-plot FIGURES.tsv OUTDIR".into());
    };
    let text = std::fs::read_to_string(input).map_err(|e| format!("{input}: {e}"))?;
    let figs = figures::parse(&text).map_err(|e| format!("{input}: {e}"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    draw::init_font().map_err(|e| e.to_string())?;
    for f in &figs {
        draw::draw(f, &out.join(format!("{}.png", f.name))).map_err(|e| e.to_string())?;
    }
    Ok(figs.len())
}

fn main() -> ExitCode {
    match run() {
        Ok(n) => {
            println!("bench-plot: {n} figure(s)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
