#!/usr/bin/env python3
"""Write the benchmark report (Markdown) from the files bench/run.sh collected.

usage: report.py OUTDIR   (reads OUTDIR/{machine.env,core.txt,callgrind.tsv,guest/results.tsv},
                           bench/notes.md; writes OUTDIR/report.md)
"""
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def machine(out):
    env = {}
    for line in (read(os.path.join(out, "machine.env")) or "").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def mmm(v, fmt="{:.1f}"):
    """'median (min–max)' of a list."""
    if not v:
        return "–"
    return (fmt + " ({}–{})").format(
        statistics.median(v), fmt.format(min(v)), fmt.format(max(v))
    )


def core_section(out, lines):
    text = read(os.path.join(out, "core.txt"))
    lines.append("## 1. Vring core: ours vs rust-vmm virtio-queue (same process, same ring)\n")
    if not text:
        lines.append("_Not run._\n")
        return
    rows = []
    for l in text.splitlines():
        if not l.startswith("RESULT "):
            continue
        kv = dict(re.findall(r"(\w+)=(\S+)", l))
        o = re.search(r"ours_ns\[median=(\S+) min=(\S+) max=(\S+)\]", l).groups()
        r = re.search(r"ref_ns\[median=(\S+) min=(\S+) max=(\S+)\]", l).groups()
        rows.append((kv, o, r))
    lines.append(
        "ns per request (wall clock), median of the runs with (min–max); one run = "
        f"{rows[0][0]['requests_per_run'] if rows else '?'} requests in bursts of "
        f"{rows[0][0]['burst'] if rows else '?'}, both sides alternating in one process.\n"
    )
    lines.append("| mix | ours ns/req | virtio-queue ns/req | ratio ours/ref (goal ≤ 0.2) | runs |")
    lines.append("|---|---|---|---|---|")
    for kv, o, r in rows:
        lines.append(
            f"| {kv['mix']} | {o[0]} ({o[1]}–{o[2]}) | {r[0]} ({r[1]}–{r[2]}) | **{kv['ratio']}** | {kv['runs']} |"
        )
    lines.append("")
    cg = read(os.path.join(out, "callgrind.tsv"))
    if cg:
        data = {}
        for l in cg.splitlines()[1:]:
            mix, side, n, ir = l.split("\t")
            data.setdefault(mix, {})[side] = int(ir) / int(n)
            reqs = n
        lines.append(
            f"Instructions per request under `valgrind --tool=callgrind` ({reqs} requests, only the "
            "measured loop counted with `--toggle-collect`; repeatable to the instruction):\n"
        )
        lines.append("| mix | ours Ir/req | virtio-queue Ir/req | ratio |")
        lines.append("|---|---|---|---|")
        for mix, d in data.items():
            o, r = d.get("ours"), d.get("ref")
            ratio = f"{o / r:.3f}" if o and r else "–"
            lines.append(f"| {mix} | {o:.0f} | {r:.0f} | **{ratio}** |")
        lines.append("")


def guest_rows(out):
    text = read(os.path.join(out, "guest", "results.tsv"))
    if not text:
        return None
    rows = []
    hdr = text.splitlines()[0].split("\t")
    for l in text.splitlines()[1:]:
        f = l.split("\t")
        d = dict(zip(hdr, f))
        for k in hdr[3:]:
            try:
                d[k] = float(d[k])
            except ValueError:
                d[k] = None
        rows.append(d)
    return rows


def slow_fractions(out):
    """% of I/Os that took 1 ms or more, per (config, job), from fio's latency_ms buckets."""
    import glob
    import json

    res = {}
    pat = re.compile(r"FIO-JSON-BEGIN (\S+) (\d+)\n(.*?)\nFIO-JSON-END", re.S)
    for path in sorted(glob.glob(os.path.join(out, "guest", "*.console.log"))):
        cfg = os.path.basename(path).split(".")[0]
        text = open(path, "rb").read().decode("utf-8", "replace").replace("\r", "")
        for m in pat.finditer(text):
            try:
                j = json.loads(m.group(3))["jobs"][0]
            except (ValueError, KeyError, IndexError):
                continue
            ms = j.get("latency_ms", {})
            res.setdefault((cfg, m.group(1)), []).append(sum(ms.values()))
    return res


def guest_section(out, env, lines):
    rows = guest_rows(out)
    slow = slow_fractions(out)
    lines.append("## 2. Guest fio: ours over vfio-user vs QEMU's built-in virtio-blk\n")
    if not rows:
        lines.append("_Not run._\n")
        return
    if env.get("GUEST_INCOMPLETE"):
        lines.append("**The guest benchmark did not finish** (see the run counts below): the rows are the runs that did.\n")
    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r["config"], r["job"]), []).append(r)
    lines.append(
        f"fio {env.get('FIO_DESC', '4k, direct=1, libaio, numjobs=1')}; "
        f"runs per job: {env.get('GUEST_RUNS', '?')}. Cells are median (min–max). Configurations:\n"
    )
    lines.append("- `ours-null`: emudevd virtio-blk, null backend (no storage cost).")
    lines.append("- `ours-file`: emudevd virtio-blk, raw image in tmpfs (`/dev/shm`), buffered preadv/pwritev (default `direct=off`).")
    lines.append("- `qemu-file`: QEMU's built-in `virtio-blk-pci,disable-legacy=on` on the same image, "
                 "`-drive ...,format=raw,cache=writeback,aio=threads` (QEMU's defaults; buffered, like ours), "
                 "no iothread (QEMU's default).\n")
    busy = [r for r in rows if r.get("other_guests")]
    if busy:
        lines.append(f"**{len(busy)} of {len(rows)} runs overlapped with another guest on the machine** "
                     "(another engineer's test): " + ", ".join(f"{r['config']}/{r['job']}#{int(float(r['run']))}" for r in busy) + ".\n")
    else:
        lines.append("No other guest ran on the machine during any run (checked at each run's start and end).\n")
    lines.append("CPU columns: host CPU time of our server / of the QEMU process while the job ran "
                 "(`/proc/PID/stat` utime+stime between the BEGIN/END markers, ramp included), "
                 "as % of one core and as µs per I/O.\n")
    for job in jobs:
        lines.append(f"### {job}\n")
        lines.append("| config | runs | IOPS | mean lat µs | p50 clat µs | p99 clat µs | I/Os ≥ 1 ms % | server CPU % | server µs/IO | QEMU CPU % | QEMU µs/IO | guest sys % |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in cfgs:
            rs = by.get((c, job), [])
            if not rs:
                continue
            col = lambda k: [r[k] for r in rs]
            pct = lambda k: [100 * r[k] / r["secs"] for r in rs if r["secs"] > 0]
            per_io = lambda k: [1e6 * r[k] / (r["iops"] * r["secs"]) for r in rs if r["iops"] > 0 and r["secs"] > 0]
            srv = "–" if c.startswith("qemu") else mmm(pct("server_cpu_s"), "{:.0f}")
            srv_io = "–" if c.startswith("qemu") else mmm(per_io("server_cpu_s"), "{:.1f}")
            lines.append(
                f"| {c} | {len(rs)} | {mmm(col('iops'), '{:.0f}')} | {mmm(col('lat_mean_us'))} | {mmm(col('lat_p50_us'))} "
                f"| {mmm(col('lat_p99_us'))} | {mmm(slow.get((c, job), []), '{:.1f}')} | {srv} | {srv_io} | {mmm(pct('qemu_cpu_s'), '{:.0f}')} "
                f"| {mmm(per_io('qemu_cpu_s'), '{:.1f}')} | {mmm(col('guest_sys'), '{:.0f}')} |"
            )
        lines.append("")
        ours = [c for c in cfgs if not c.startswith("qemu")]
        if any(r.get("srv_requests") for c in ours for r in by.get((c, job), [])):
            lines.append("Our server's counters over the job (from `emudevd --control` `query-stats`), per request:\n")
            lines.append("| config | kicks / req | interrupts / req | poller iterations / req | poller sleeps / req | poller thread CPU % | other server threads CPU % |")
            lines.append("|---|---|---|---|---|---|---|")
            for c in ours:
                rs = [r for r in by.get((c, job), []) if r.get("srv_requests")]
                if not rs:
                    continue
                per = lambda k: [r[k] / r["srv_requests"] for r in rs]
                lines.append(
                    f"| {c} | {mmm(per('kicks'), '{:.3f}')} | {mmm(per('interrupts'), '{:.3f}')} "
                    f"| {mmm(per('iterations'), '{:.1f}')} | {mmm(per('sleeps'), '{:.3f}')} "
                    f"| {mmm([100 * r['poller_cpu_s'] / r['secs'] for r in rs], '{:.0f}')} "
                    f"| {mmm([100 * (r['server_cpu_s'] - r['poller_cpu_s']) / r['secs'] for r in rs], '{:.0f}')} |"
                )
            lines.append("")
    # Ratios against the built-in device.
    def med(c, j, k, clean=False):
        v = [r[k] for r in by.get((c, j), []) if not (clean and r.get("other_guests"))]
        return statistics.median(v) if v else None

    def ratio(c, j, k, clean=False):
        v, b = med(c, j, k, clean), med("qemu-file", j, k, clean)
        return f"{v / b:.2f}" if v and b else "–"

    lines.append("### Ratios against QEMU's built-in virtio-blk (medians)\n")
    lines.append("`clean`: only runs during which no other guest was seen on the machine.\n")
    lines.append("| job | metric | goal | ours-file / qemu-file | clean | ours-null / qemu-file | clean |")
    lines.append("|---|---|---|---|---|---|---|")
    for job in jobs:
        qd1 = job.endswith("-qd1")
        metrics = [("mean latency", "lat_mean_us", "≤ 1.0 (no worse)"), ("p50 latency", "lat_p50_us", "–"),
                   ("IOPS", "iops", "–")] if qd1 else [("IOPS", "iops", "≥ 1.3" if "qd32" in job else "–")]
        for metric, key, goal in metrics:
            cells = [ratio(c, job, key, clean) for c in ("ours-file", "ours-null") for clean in (False, True)]
            lines.append(f"| {job} | {metric} | {goal} | **{cells[0]}** | {cells[1]} | **{cells[2]}** | {cells[3]} |")
    lines.append("")


def main():
    out = sys.argv[1]
    env = machine(out)
    lines = ["# Benchmarks\n"]
    lines.append(
        "Generated by `bench/run.sh` (`--update-docs` copies it here). Speed is only ever stated "
        "as a ratio against a peer measured in the same run on the same machine: on these 2-core "
        "TCG machines absolute numbers are noise.\n"
    )
    lines.append("## Machine and run\n")
    lines.append("| | |")
    lines.append("|---|---|")
    for k, label in [
        ("DATE", "date (UTC)"), ("COMMIT", "commit"), ("NPROC", "host CPUs (`nproc`)"),
        ("CPU", "CPU model"), ("HOST_KERNEL", "host kernel"), ("ACCEL", "guest accelerator"),
        ("QEMU", "QEMU"), ("GUEST_KERNEL", "guest kernel"), ("GUEST_CPUS", "guest vCPUs / RAM"),
        ("FIO", "fio (guest)"), ("RUSTC", "rustc"), ("LOAD", "load average before / after"),
        ("CORE_RUNS", "core runs"), ("GUEST_RUNS", "guest runs per job"), ("ELAPSED", "total time"),
    ]:
        if k in env:
            lines.append(f"| {label} | {env[k]} |")
    lines.append("")
    core_section(out, lines)
    guest_section(out, env, lines)
    notes = read(os.path.join(HERE, "notes.md"))
    if notes:
        lines.append(notes.rstrip() + "\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
