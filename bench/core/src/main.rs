//! Vring-core benchmark: ns per null virtio-blk request through our split ring + blk engine,
//! beside a reference loop on rust-vmm virtio-queue 0.16, on the same fd-backed guest RAM,
//! the same ring and the same 3-descriptor requests, alternating in one process.
//!
//! ```text
//! bench-core [--mix read|write|ring|all] [--burst N] [--requests N] [--runs N] [--warmup N]
//!            [--only ours|ref]
//! ```
//! Prints one `RESULT` line per mix (parsed by `bench/run.sh`). `--only` runs one side (for
//! `valgrind --tool=callgrind --toggle-collect='emudev_bench_loop_{ours,ref}*'`).

mod ours;
mod reference;
mod setup;

use std::process::ExitCode;
use std::time::Instant;

use ours::{emudev_bench_loop_ours, emudev_bench_loop_ours_ring, Ours};
use reference::{emudev_bench_loop_ref, emudev_bench_loop_ref_ring, Reference};
use setup::{Fixture, Mix};

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error(transparent)]
    Ours(#[from] ours::OursError),
    #[error(transparent)]
    Queue(#[from] emudev_virtio::QueueError),
    #[error(transparent)]
    Ref(#[from] reference::RefError),
    #[error("{side}: {failed} of {requests} requests did not complete OK")]
    Failed {
        side: &'static str,
        failed: u64,
        requests: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    Both,
    Ours,
    Ref,
}

#[derive(Debug)]
struct Args {
    mixes: Vec<Mix>,
    burst: u16,
    requests: u32,
    runs: usize,
    warmup: usize,
    only: Only,
}

fn parse_args() -> Result<Args, BenchError> {
    let mut a = Args {
        mixes: vec![Mix::Read, Mix::Write, Mix::Ring],
        burst: 32,
        requests: 256_000,
        runs: 7,
        warmup: 1,
        only: Only::Both,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| BenchError::Usage(format!("{k}: missing value")))?;
        let bad = || BenchError::Usage(format!("{k} {v}: bad value"));
        match k.as_str() {
            "--mix" => {
                a.mixes = match v.as_str() {
                    "read" => vec![Mix::Read],
                    "write" => vec![Mix::Write],
                    "ring" => vec![Mix::Ring],
                    "all" => vec![Mix::Read, Mix::Write, Mix::Ring],
                    _ => return Err(bad()),
                }
            }
            "--burst" => a.burst = v.parse().map_err(|_| bad())?,
            "--requests" => a.requests = v.parse().map_err(|_| bad())?,
            "--runs" => a.runs = v.parse().map_err(|_| bad())?,
            "--warmup" => a.warmup = v.parse().map_err(|_| bad())?,
            "--only" => {
                a.only = match v.as_str() {
                    "ours" => Only::Ours,
                    "ref" => Only::Ref,
                    _ => return Err(bad()),
                }
            }
            _ => return Err(BenchError::Usage(format!("unknown option {k}"))),
        }
    }
    if a.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".into()));
    }
    Ok(a)
}

/// (median, min, max) of a non-empty sample.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn run_mix(a: &Args, mix: Mix) -> Result<(), BenchError> {
    let mut fx = Fixture::new(mix, a.burst)?;
    let mut ours = Ours::new(&fx)?;
    let mut reference = Reference::new(&fx)?;
    let rounds = (a.requests / u32::from(a.burst)).max(1);
    let per_run = f64::from(rounds) * f64::from(a.burst);
    let (mut t_ours, mut t_ref) = (Vec::new(), Vec::new());
    let mut sink = 0u64;
    for run in 0..a.warmup + a.runs {
        // Alternate which side goes first so neither always runs on a cache the other warmed.
        for side in [run % 2, 1 - run % 2] {
            if side == 0 && a.only != Only::Ref {
                ours.resync(&fx)?;
                let t = Instant::now();
                sink = sink.wrapping_add(if mix == Mix::Ring {
                    emudev_bench_loop_ours_ring(&mut ours, &mut fx, rounds)
                } else {
                    emudev_bench_loop_ours(&mut ours, &mut fx, rounds)
                });
                let ns = t.elapsed().as_nanos() as f64 / per_run;
                if run >= a.warmup {
                    t_ours.push(ns);
                }
            } else if side == 1 && a.only != Only::Ours {
                reference.resync(&fx);
                let t = Instant::now();
                sink = sink.wrapping_add(if mix == Mix::Ring {
                    emudev_bench_loop_ref_ring(&mut reference, &mut fx, rounds)
                } else {
                    emudev_bench_loop_ref(&mut reference, &mut fx, rounds)
                });
                let ns = t.elapsed().as_nanos() as f64 / per_run;
                if run >= a.warmup {
                    t_ref.push(ns);
                }
            }
        }
    }
    let (n, failed) = ours.counts();
    if failed > 0 {
        return Err(BenchError::Failed {
            side: "ours",
            failed,
            requests: n,
        });
    }
    if reference.failed > 0 {
        return Err(BenchError::Failed {
            side: "reference",
            failed: reference.failed,
            requests: reference.requests,
        });
    }
    let fmt = |v: &mut Vec<f64>| {
        if v.is_empty() {
            "median=- min=- max=-".to_string()
        } else {
            let (m, lo, hi) = stats(v);
            format!("median={m:.1} min={lo:.1} max={hi:.1}")
        }
    };
    let ratio = match (t_ours.is_empty(), t_ref.is_empty()) {
        (false, false) => format!("{:.3}", stats(&mut t_ours).0 / stats(&mut t_ref).0),
        _ => "-".into(),
    };
    println!(
        "RESULT mix={} burst={} requests_per_run={} runs={} ours_ns[{}] ref_ns[{}] ratio={} checked={}/{} sink={}",
        mix.name(),
        a.burst,
        per_run,
        a.runs,
        fmt(&mut t_ours),
        fmt(&mut t_ref),
        ratio,
        n,
        reference.requests,
        sink & 0xffff
    );
    Ok(())
}

fn main() -> ExitCode {
    let r = parse_args().and_then(|a| a.mixes.iter().try_for_each(|&m| run_mix(&a, m)));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-core: {e}");
            ExitCode::FAILURE
        }
    }
}
