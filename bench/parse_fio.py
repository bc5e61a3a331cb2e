#!/usr/bin/env python3
"""Extract fio JSON results from a guest console log and join them with the host CPU samples.

usage: parse_fio.py CONFIG CONSOLE_LOG MARKS_FILE CLK_TCK
Prints one TSV row per run: config job run iops lat_mean_us lat_p50_us lat_p99_us guest_usr
guest_sys secs server_cpu_s qemu_cpu_s, plus srv_requests kicks interrupts iterations sleeps
poller_cpu_s when the marks carry emudevd counters ("-" where unknown; see bench/guest-blk.sh).
"""
import json
import re
import sys


def blocks(text):
    """Yield (job, run, json_text) for every FIO-JSON-BEGIN/END block."""
    pat = re.compile(r"FIO-JSON-BEGIN (\S+) (\d+)\n(.*?)\nFIO-JSON-END \1 \2", re.S)
    for m in pat.finditer(text):
        yield m.group(1), int(m.group(2)), m.group(3)


def load(js):
    try:
        return json.loads(js)
    except json.JSONDecodeError:
        # Kernel messages can interleave on the serial console: drop them and retry.
        kept = [l for l in js.split("\n") if not re.match(r"^\s*\[\s*\d+\.\d+\]", l)]
        return json.loads("\n".join(kept))


def main():
    cfg, console, marks_file, tick = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    text = open(console, "rb").read().decode("utf-8", "replace").replace("\r", "")
    marks = {}
    for line in open(marks_file):
        f = line.split()
        kind, job, run, t, srv, qemu = f[:6]
        marks[(kind, job, int(run))] = (float(t), int(srv), int(qemu), f[6:])
    extra = any(len(v[3]) >= 6 for v in marks.values())
    n = 0
    for job, run, js in blocks(text):
        d = load(js)["jobs"][0]
        side = "read" if d["read"]["io_bytes"] > 0 else "write"
        r = d[side]
        # Total-latency percentiles (fio --lat_percentiles=1) when present: completion latency
        # alone is not comparable across devices (QEMU's built-in virtio-blk does part of the
        # request inside the guest's submission under TCG).
        pct = r.get("lat_ns", {}).get("percentile") or r["clat_ns"].get("percentile", {})
        b = marks.get(("BENCH-BEGIN", job, run))
        e = marks.get(("BENCH-END", job, run))
        secs = srv = qemu = float("nan")
        if b and e:
            secs = e[0] - b[0]
            srv = (e[1] - b[1]) / tick
            qemu = (e[2] - b[2]) / tick
        cols = []
        if extra:
            for i in range(6):
                try:
                    dv = int(e[3][i]) - int(b[3][i])
                    cols.append(round(dv / 1e9, 3) if i == 5 else dv)
                except (TypeError, ValueError, IndexError):
                    cols.append("-")
        if extra:
            try:
                cols.append(max(int(b[3][6]), int(e[3][6])))
            except (TypeError, ValueError, IndexError):
                cols.append("-")
        print(
            "\t".join(
                str(x)
                for x in [
                    cfg, job, run,
                    round(r["iops"], 1),
                    round(r["lat_ns"]["mean"] / 1000, 1),
                    round(pct.get("50.000000", float("nan")) / 1000, 1),
                    round(pct.get("99.000000", float("nan")) / 1000, 1),
                    round(d["usr_cpu"], 1), round(d["sys_cpu"], 1),
                    round(secs, 2), round(srv, 2), round(qemu, 2),
                ]
                + cols
            )
        )
        n += 1
    if n == 0:
        sys.exit("no fio results in " + console)


if __name__ == "__main__":
    main()
