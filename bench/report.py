#!/usr/bin/env python3
"""Write the benchmark report (Markdown) from the files bench/run.sh collected.

usage: report.py OUTDIR   (reads OUTDIR/{machine.env,proto.txt,core.txt,callgrind.tsv,scale.txt,
                           guest/results.tsv,net/net.tsv}, bench/notes.md; writes OUTDIR/report.md
                           and OUTDIR/figures.tsv, which bench-plot turns into the PNGs)
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


# Rows of figures.tsv: (figure, title, ylabel, group, series, median, min, max).
FIGS = []
# Rows of the goals table: (goal, target, measured, met).
GOALS = []


def fig(name, title, ylabel, group, series, vals=None, mmm3=None):
    """Add one bar: from a list of values, or from a (median, min, max) tuple."""
    if mmm3 is None:
        if not vals:
            return
        mmm3 = (statistics.median(vals), min(vals), max(vals))
    if any(v is None or v != v for v in mmm3):
        return
    FIGS.append((name, title, ylabel, group, series) + tuple(mmm3))


def write_figs(out):
    with open(os.path.join(out, "figures.tsv"), "w") as f:
        f.write("figure\ttitle\tylabel\tgroup\tseries\tmedian\tmin\tmax\n")
        for r in FIGS:
            f.write("\t".join(str(round(x, 3)) if isinstance(x, float) else str(x) for x in r) + "\n")


def img(lines, name, alt):
    if any(r[0] == name for r in FIGS):
        lines.append(f"![{alt}]({name}.png)\n")


def proto_section(out, lines):
    text = read(os.path.join(out, "proto.txt"))
    lines.append("## 1. Protocol: our server vs the rust-vmm vfio-user example server\n")
    if not text:
        lines.append("_Not run._\n")
        return
    res = {}
    for l in text.splitlines():
        if not l.startswith("RESULT "):
            continue
        kv = dict(re.findall(r"(\w+)=([^\s\[]+)", l))
        m = re.search(r"msgs_per_s\[median=(\S+) min=(\S+) max=(\S+)\]", l)
        key = (kv["side"], kv["op"])
        res[key] = (tuple(float(x) for x in m.groups()), kv) if m else (None, kv)
    names = {"read": "REGION_READ 4 B (round trip)", "write": "REGION_WRITE 4 B (round trip)",
             "posted": "posted REGION_WRITE 4 B", "multi": "posted REGION_WRITE_MULTI"}
    runs = next((kv.get("runs") for _, kv in res.values() if kv.get("runs")), "?")
    ops = next((kv.get("ops_per_run") for _, kv in res.values() if kv.get("ops_per_run")), "?")
    lines.append(
        f"Our client (`emudev_vfio_user::Client`) against each server over a UNIX socket, one message at "
        f"a time; messages per second, median (min–max) of {runs} runs of {ops} messages after a warm-up. "
        "Ours serves the test device through the whole device layer (PCI model, BAR routing, "
        "register side effects); the rust-vmm `vfio_user` 0.1.7 `Server` calls a backend that only copies "
        "bytes into a 256-byte array, so the comparison favours it. Posted runs end with one "
        "REGION_READ that checks the last write landed.\n")
    lines.append("| message | ours msgs/s | rust-vmm msgs/s | ours / rust-vmm |")
    lines.append("|---|---|---|---|")
    for op in ("read", "write", "posted", "multi"):
        o, okv = res.get(("ours", op), (None, {}))
        r, rkv = res.get(("rustvmm", op), (None, {}))
        if not okv and not rkv:
            continue
        label = names[op] + (f" ({okv.get('batch')} writes each)" if op == "multi" and okv else "")
        cell = lambda v, kv: (f"{v[0]:,.0f} ({v[1]:,.0f}–{v[2]:,.0f})" if v else
                              ("unsupported" if kv.get("unsupported") else "–"))
        ratio = f"**{o[0] / r[0]:.2f}**" if o and r else "–"
        lines.append(f"| {label} | {cell(o, okv)} | {cell(r, rkv)} | {ratio} |")
        grp = {"read": "READ", "write": "WRITE", "posted": "posted WRITE", "multi": "posted MULTI"}[op]
        t = "vfio-user messages/s (higher is better)"
        if o:
            fig("proto", t, "k messages/s", grp, "ours", mmm3=tuple(x / 1000 for x in o))
        if r:
            fig("proto", t, "k messages/s", grp, "rust-vmm vfio_user", mmm3=tuple(x / 1000 for x in r))
    lines.append("")
    rkv = res.get(("rustvmm", "multi"), (None, {}))[1]
    if rkv.get("unsupported"):
        lines.append(f"rust-vmm 0.1.7 has no REGION_WRITE_MULTI (its answer: `{rkv['unsupported'].replace('_', ' ')}`).\n")
    img(lines, "proto", "vfio-user message rates")


def scale_section(out, lines):
    text = read(os.path.join(out, "scale.txt"))
    lines.append("## 3. Scale: devices on one poller thread\n")
    if not text:
        lines.append("_Not run._\n")
        return
    rows = []
    for l in text.splitlines():
        if l.startswith("RESULT "):
            kv = dict(re.findall(r"(\w+)=([^\s\[]+)", l))
            m = re.search(r"iops_per_dev\[median=(\S+) min=(\S+) max=(\S+)\]", l)
            rows.append((kv, tuple(float(x) for x in m.groups()) if m else None))
    lines.append(
        "In-process (no guest: a TCG guest with 16 vfio-user devices measures QEMU, not us): "
        "`bench-scale` creates N virtio-blk devices (null backend, 1 queue of 128 each, all "
        "enabled) on ONE poller thread behind emudev's in-process transport (the same adapter "
        "vfio-user messages go through), then measures: idle CPU of the process (utime+stime "
        "from `/proc/self/stat`) over an idle interval after a 1 s settle; growth of `RssAnon` per "
        "device (guest RAM is a memfd and not counted); and IOPS per device with one driver thread "
        "keeping 32 4 KiB reads in flight on every queue.\n")
    lines.append("| devices (polled queues) | idle CPU % of a core (goal < 2 with 16) | poller thread idle CPU % | RssAnon KiB / device after bring-up | … after I/O | IOPS per device, median (min–max) | total IOPS | process CPU % busy |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for kv, iops in rows:
        io = f"{iops[0]:,.0f} ({iops[1]:,.0f}–{iops[2]:,.0f})" if iops else "–"
        lines.append(f"| {kv['devices']} ({kv['polled_queues']}) | **{kv['idle_cpu_pct']}** | {kv['poller_idle_cpu_pct']} "
                     f"| {kv['rss_anon_kib_per_dev_up']} | {kv['rss_anon_kib_per_dev_io']} | {io} | {float(kv['iops_total']):,.0f} | {kv['busy_cpu_pct']} |")
        if iops:
            fig("scale", "IOPS per device, N devices on one poller (in-process)", "k IOPS per device",
                f"{kv['devices']} devices", "ours", mmm3=tuple(x / 1000 for x in iops))
        if kv["polled_queues"] == "16":
            v = float(kv["idle_cpu_pct"])
            GOALS.append(("idle CPU with 16 polled queues", "< 2 % of a core", f"{v:.2f} %", v < 2))
    lines.append("")
    img(lines, "scale", "IOPS per device vs number of devices")


def net_section(out, env, lines):
    text = read(os.path.join(out, "net", "net.tsv"))
    lines.append("## 5. Guest network: our virtio-net and AVF vs QEMU's virtio-net\n")
    if not text:
        lines.append("_Not run._\n")
        return
    if env.get("NET_INCOMPLETE"):
        lines.append("**The net benchmark did not finish cleanly** (see `net/run.log`): the rows are what it measured.\n")
    vals, failed = {}, {}
    for l in text.splitlines():
        f = l.split("\t")
        if len(f) < 4:
            continue
        nic, test = f[0], f[1]
        if f[3] == "FAILED":
            failed[(nic, test)] = failed.get((nic, test), 0) + 1
            continue
        try:
            vals.setdefault((nic, test), []).append(float(f[3]))
        except ValueError:
            pass
    nics = [n for n in ("ours-net", "ours-avf", "qemu-net") if any(k[0] == n for k in list(vals) + list(failed))]
    lines.append(
        f"One guest ({env.get('GUEST_CPUS', '2 vCPUs')}) with the three NICs, each on its own tap in a private "
        "network namespace with link-local addresses; iperf3 3.x in the guest against `iperf3 -s` in the "
        f"namespace; {env.get('NET_RUNS', '?')}. `ours-net`: emudevd virtio-net (tap backend), `ours-avf`: "
        "emudevd AVF with the guest's iavf driver (tap backend), `qemu-net`: QEMU's `virtio-net-pci` on a tap "
        "with `vhost=off`. tx = guest → namespace TCP, rx = namespace → guest TCP (`-R`), udp64 = 64-byte UDP "
        "datagrams at full speed (`-u -l 64 -b 0`), packets/s the namespace received. Median (min–max).\n")
    hdr = "| test | " + " | ".join(nics) + " | " + " | ".join(f"{n} / qemu-net" for n in nics if n != "qemu-net") + " |"
    lines.append(hdr)
    lines.append("|" + "---|" * (1 + len(nics) + len([n for n in nics if n != "qemu-net"])))
    for test, unit, scale in (("tx", "Mbit/s", 1e6), ("rx", "Mbit/s", 1e6), ("udp64", "kpps", 1e3)):
        cells, ratios = [], []
        for n in nics:
            v = [x / scale for x in vals.get((n, test), [])]
            fails = failed.get((n, test), 0)
            c = mmm(v, "{:,.0f}" if unit == "Mbit/s" else "{:,.1f}") if v else "–"
            if fails:
                c += f" ({fails} failed)"
            cells.append(c)
            if v:
                fig("net_tcp" if test != "udp64" else "net_udp",
                    "Guest TCP throughput (higher is better)" if test != "udp64" else "Guest 64-byte UDP rate (higher is better)",
                    "Mbit/s" if test != "udp64" else "k packets/s", test, n, [x for x in v])
        q = vals.get(("qemu-net", test))
        for n in nics:
            if n == "qemu-net":
                continue
            o = vals.get((n, test))
            r = statistics.median(o) / statistics.median(q) if o and q else None
            ratios.append(f"**{r:.2f}**" if r else "–")
            if r and test in ("tx", "rx"):
                GOALS.append((f"net {test} {n} / QEMU virtio-net", "≥ 1.0", f"{r:.2f}", r >= 1.0))
        lines.append(f"| {test} ({unit}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    cpu = read(os.path.join(out, "net", "server-cpu.txt"))
    if cpu:
        lines.append("Our servers' CPU time over the whole boot (all rounds): " +
                     ", ".join(" ".join(l.split()[1:]) for l in cpu.splitlines()) + ".\n")
    img(lines, "net_tcp", "TCP throughput")
    img(lines, "net_udp", "64-byte UDP packet rate")


def core_section(out, lines):
    text = read(os.path.join(out, "core.txt"))
    lines.append("## 2. Vring core: ours vs rust-vmm virtio-queue (same process, same ring)\n")
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
        t = "Vring core ns per request (lower is better)"
        fig("core", t, "ns / request", kv["mix"], "ours", mmm3=tuple(float(x) for x in o))
        fig("core", t, "ns / request", kv["mix"], "virtio-queue reference", mmm3=tuple(float(x) for x in r))
        if kv["mix"] in ("write", "ring"):
            try:
                v = float(kv["ratio"])
                what = "null-blk request" if kv["mix"] == "write" else "ring only"
                GOALS.append((f"core ns/request ours / virtio-queue ({what}, wall clock)", "≤ 0.2", f"{v:.2f}", v <= 0.2))
            except ValueError:
                pass
    lines.append("")
    img(lines, "core", "vring core ns per request")
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
            if mix == "write" and o and r:
                GOALS.append(("core instructions/request ours / virtio-queue (null-blk request, callgrind)",
                              "≤ 0.2", f"{o / r:.2f}", o / r <= 0.2))
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
    lines.append("## 4. Guest block: fio in a guest, ours over vfio-user vs QEMU's virtio-blk and vhost-user-blk\n")
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
                 "no iothread (QEMU's default).")
    lines.append("- `vhost-file`: QEMU's `vhost-user-blk-pci` served by `qemu-storage-daemon` "
                 f"({env.get('QSD', '?')}) exporting the same image (`--blockdev driver=file,cache.direct=off,aio=threads`, "
                 "`--export type=vhost-user-blk`): the standard out-of-process path.")
    lines.append("- Every device has the same number of queues (one per vCPU, QEMU's default for its own). "
                 "Job names: `RW-qdDEPTH-jJOBS` (fio `numjobs`, group reporting).\n")
    busy = [r for r in rows if r.get("other_guests")]
    if busy:
        lines.append(f"**{len(busy)} of {len(rows)} runs overlapped with another guest on the machine** "
                     "(another engineer's test): " + ", ".join(f"{r['config']}/{r['job']}#{int(float(r['run']))}" for r in busy) + ".\n")
    else:
        lines.append("No other guest ran on the machine during any run (checked at each run's start and end).\n")
    lines.append("Latency: `mean lat` is fio's total latency (submission + completion), the one to compare "
                 "across devices. p50/p99 are total-latency percentiles when fio reported them (`--lat_percentiles=1`, "
                 "runs after this change), else completion-latency (clat) percentiles, which are NOT comparable "
                 "across devices: under TCG QEMU's built-in virtio-blk handles the notify inside the guest's "
                 "submission, so its clat p50 (~16 µs) leaves out most of the request.\n")
    lines.append("CPU columns: host CPU time of the server process (ours, or qemu-storage-daemon for vhost-file) / of the QEMU process while the job ran "
                 "(`/proc/PID/stat` utime+stime between the BEGIN/END markers, ramp included), "
                 "as % of one core and as µs per I/O.\n")
    for job in jobs:
        lines.append(f"### {job}\n")
        lines.append("| config | runs | IOPS | mean lat µs | p50 µs | p99 µs | I/Os ≥ 1 ms % | server CPU % | server µs/IO | QEMU CPU % | QEMU µs/IO | guest sys % |")
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
            # (vhost-file: the server is qemu-storage-daemon)
            lines.append(
                f"| {c} | {len(rs)} | {mmm(col('iops'), '{:.0f}')} | {mmm(col('lat_mean_us'))} | {mmm(col('lat_p50_us'))} "
                f"| {mmm(col('lat_p99_us'))} | {mmm(slow.get((c, job), []), '{:.1f}')} | {srv} | {srv_io} | {mmm(pct('qemu_cpu_s'), '{:.0f}')} "
                f"| {mmm(per_io('qemu_cpu_s'), '{:.1f}')} | {mmm(col('guest_sys'), '{:.0f}')} |"
            )
        lines.append("")
        ours = [c for c in cfgs if c.startswith("ours")]
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

    def ratio_vs(c, base, j, k):
        v, b = med(c, j, k), med(base, j, k)
        return v / b if v and b else None

    f2 = lambda x: f"{x:.2f}" if x is not None else "–"
    lines.append("### Ratios (medians)\n")
    lines.append("Against QEMU's built-in virtio-blk (`qemu-file`) and against vhost-user-blk with "
                 "qemu-storage-daemon (`vhost-file`), same image, same run. Goals: QD32 IOPS ours ÷ built-in ≥ 1.3 "
                 "and ours ÷ vhost-user-blk ≥ 1.0; QD1 latency no worse than built-in (≤ 1.0).\n")
    lines.append("| job | metric | ours-file / qemu-file | ours-null / qemu-file | ours-file / vhost-file | ours-null / vhost-file |")
    lines.append("|---|---|---|---|---|---|")
    q32_b, q32_v, q1_lat = [], [], []
    for job in jobs:
        qd1 = "-qd1" in job and "-qd16" not in job
        metrics = [("mean latency", "lat_mean_us"), ("IOPS", "iops")] if qd1 else [("IOPS", "iops")]
        for metric, key in metrics:
            r = [ratio_vs(c, b, job, key) for b in ("qemu-file", "vhost-file") for c in ("ours-file", "ours-null")]
            lines.append(f"| {job} | {metric} | **{f2(r[0])}** | {f2(r[1])} | **{f2(r[2])}** | {f2(r[3])} |")
            if "qd32" in job and key == "iops":
                if r[0] is not None:
                    q32_b.append((job, r[0]))
                if r[2] is not None:
                    q32_v.append((job, r[2]))
            if qd1 and key == "lat_mean_us" and r[0] is not None:
                q1_lat.append((job, r[0]))
    lines.append("")
    rng = lambda v: f"{min(x for _, x in v):.2f}–{max(x for _, x in v):.2f} over {', '.join(j for j, _ in v)}"
    if q32_b:
        GOALS.append(("guest fio QD32 IOPS ours-file / QEMU built-in", "≥ 1.3", rng(q32_b), min(x for _, x in q32_b) >= 1.3))
    if q32_v:
        GOALS.append(("guest fio QD32 IOPS ours-file / vhost-user-blk", "≥ 1.0", rng(q32_v), min(x for _, x in q32_v) >= 1.0))
    if q1_lat:
        GOALS.append(("guest fio QD1 mean latency ours-file / QEMU built-in", "≤ 1.0", rng(q1_lat), max(x for _, x in q1_lat) <= 1.0))
    # Figures: QD32 IOPS and QD1 mean latency, every configuration.
    for job in jobs:
        for c in cfgs:
            rs = by.get((c, job), [])
            if "qd32" in job:
                fig("blk_qd32", "Guest fio 4k QD32 IOPS (higher is better)", "k IOPS", job, c,
                    [r["iops"] / 1000 for r in rs])
            elif "-qd1" in job:
                fig("blk_qd1", "Guest fio 4k QD1 mean latency (lower is better)", "µs", job, c,
                    [r["lat_mean_us"] for r in rs])
    img(lines, "blk_qd32", "guest fio QD32 IOPS")
    img(lines, "blk_qd1", "guest fio QD1 latency")


def main():
    out = sys.argv[1]
    env = machine(out)
    body = []
    proto_section(out, body)
    core_section(out, body)
    scale_section(out, body)
    guest_section(out, env, body)
    net_section(out, env, body)
    lines = ["# Benchmarks\n"]
    lines.append(
        "Generated by `bench/run.sh` (`--update-docs` copies it here and the plots to `docs/bench/`). "
        "Speed is only ever stated as a ratio against a peer measured in the same run on the same "
        "machine: on these 2-core TCG machines absolute numbers are noise. Every figure is the median "
        "of the runs, with (min–max); the plots show the median as the bar and min–max as the whisker.\n"
    )
    if env.get("QUICK") == "1":
        lines.append("**QUICK run** (`--quick`): short runs to check the setup; not for conclusions.\n")
    lines.append("## Machine and run\n")
    lines.append("| | |")
    lines.append("|---|---|")
    for k, label in [
        ("DATE", "date (UTC)"), ("COMMIT", "commit measured"), ("DIRTY", "files changed from it in the tree"), ("NPROC", "host CPUs (`nproc`)"),
        ("CPU", "CPU model"), ("MEM", "host RAM"), ("HOST_KERNEL", "host kernel"), ("ACCEL", "guest accelerator"),
        ("QEMU", "QEMU"), ("QSD", "qemu-storage-daemon"), ("GUEST_KERNEL", "guest kernel"),
        ("GUEST_CPUS", "guest vCPUs / RAM"), ("FIO", "fio (guest)"), ("RUSTC", "rustc"),
        ("LOAD", "load average before"), ("LOAD_AFTER", "load average after"),
        ("RUNS", "runs per figure"), ("CORE_RUNS", "core runs"), ("GUEST_RUNS", "guest block runs"),
        ("NET_RUNS", "guest net runs"), ("ELAPSED", "total time of `bench/run.sh`"),
        ("RERUN", "stage rerun"), ("ELAPSED_RERUN", "time of the rerun"),
    ]:
        if k in env:
            lines.append(f"| {label} | {env[k]} |")
    lines.append("")
    lines.append("## Goals\n")
    if GOALS:
        lines.append("| goal | target | measured | met |")
        lines.append("|---|---|---|---|")
        for g, t, m, ok in GOALS:
            lines.append(f"| {g} | {t} | {m} | {'yes' if ok else '**no**'} |")
        lines.append("")
    else:
        lines.append("_No stage that measures a goal ran._\n")
    lines += body
    notes = read(os.path.join(HERE, "notes.md"))
    if notes:
        lines.append(notes.rstrip() + "\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    write_figs(out)


if __name__ == "__main__":
    main()
