"""Turn records.jsonl into summary.md (medians, min-max, ratios) and PNG charts.

Ratios are per metric: median of an implementation divided by the median of
kernel overlayfs (and of fuse-overlayfs) from the same run; below 1 is faster.
One chart per configuration and workload group, ratios to the kernel as bars.
The FUSE request ledger (`fuse_requests` records) gets a section of its own:
requests per workload and target, and per opcode the count and mean time.
"""
import collections
import json
import math
import os
import statistics

BASELINES = ("overlay", "fuse-overlayfs", "pyfuse3-floor")
BASELINE_LABELS = {"overlay": "kernel overlayfs", "fuse-overlayfs": "fuse-overlayfs",
                   "pyfuse3-floor": "the pyfuse3 floor"}
NOT_RATIOED = {"server_vmhwm_kib", "mismatches", "fuse_requests"}
LEDGER_TOP_OPS = 8      # the opcodes shown per workload and target, most frequent first


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s"
    if unit == "us":
        return f"{value:.1f} µs"
    if unit == "KiB":
        return f"{value / 1024:.0f} MiB"
    return f"{value:g}"


class Table:
    """Medians and ranges of records, keyed by (config, group, workload, metric, impl)."""

    def __init__(self, records):
        self.values = collections.defaultdict(list)
        self.units = {}
        self.impls, self.configs = [], []
        self.order = []  # (config, group, workload, metric) in first-seen order
        for rec in records:
            if rec["impl"] == "*":  # a whole configuration was skipped
                continue
            if rec["impl"] not in self.impls:
                self.impls.append(rec["impl"])
            if rec["config"] not in self.configs:
                self.configs.append(rec["config"])
            if rec["value"] is None or rec["metric"] in ("skipped", "error"):
                continue
            key = (rec["config"], rec.get("group", "?"), rec["workload"], rec["metric"])
            if key not in self.order:
                self.order.append(key)
            self.values[key + (rec["impl"],)].append(rec["value"])
            self.units[rec["metric"]] = rec["unit"]

    def median(self, key, impl):
        vals = self.values.get(key + (impl,))
        return statistics.median(vals) if vals else None

    def cell(self, key, impl):
        vals = self.values.get(key + (impl,))
        if not vals:
            return "-"
        unit = self.units[key[3]]
        text = _fmt(statistics.median(vals), unit)
        if len(vals) > 1:
            text += f" ({_fmt(min(vals), unit)}–{_fmt(max(vals), unit)})"
        return text

    def ratio(self, key, impl, base):
        a, b = self.median(key, impl), self.median(key, base)
        if a is None or not b:
            return None
        return a / b


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _ratioed_keys(table, config):
    """The keys of one configuration's ratioed metrics, and their groups in order."""
    keys = [k for k in table.order if k[0] == config and k[3] not in NOT_RATIOED
            and k[2] != "correctness"]
    return keys, list(dict.fromkeys(k[1] for k in keys))


def _overview(table):
    """Per configuration and group: the geometric mean of each target's ratios to the kernel."""
    rows = []
    for config in table.configs:
        keys, groups = _ratioed_keys(table, config)
        for group in groups:
            row = [config, group]
            for impl in table.impls:
                ratios = [table.ratio(k, impl, "overlay") for k in keys if k[1] == group]
                ratios = [r for r in ratios if r]
                row.append(f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}"
                           if ratios else "-")
            rows.append(row)
    if not rows:
        return []
    return ["## Overview", "",
            "Geometric mean over each group's metrics of the ratio to kernel overlayfs "
            "(below 1 = faster than the kernel):", "",
            _md_table(["config", "group"] + table.impls, rows), ""]


def write_summary(records, out_dir, run_info):
    table = Table(records)
    impls = table.impls
    lines = [f"# unionfs bench: {run_info.get('started', '')}", ""]
    lines.append(f"- kernel {run_info.get('kernel')}, commit {run_info.get('commit')}, "
                 f"stack `{run_info.get('stack')}` ({run_info.get('merged_files')} merged "
                 f"regular files), {'quick' if run_info.get('quick') else 'full'} run")
    lines.append(f"- repetitions: {run_info.get('reps')} "
                 f"(workloads on the largest file: {run_info.get('heavy_reps')}); "
                 "a fresh mount and upper for every run; "
                 "targets interleaved in a shuffled order per repetition")
    lines.append(f"- wall time: {run_info.get('elapsed_s', 0):.0f} s")
    lines.append("- cells: median (min–max); ratios: median / median of the same metric "
                 "for kernel overlayfs and fuse-overlayfs in this run (below 1 = faster)")
    lines.append("")
    versions = run_info.get("versions", {})
    lines += ["## Targets", "", _md_table(["target", "version"],
                                          [[i, versions.get(i, "?")] for i in impls]), ""]
    skipped = [r for r in records if r["metric"] == "skipped"]
    if skipped:
        lines += ["Skipped:", ""]
        lines += [f"- {r['impl']} ({r['config']}): {r.get('reason')}" for r in skipped]
        lines.append("")
    checks = [r for r in records if r["workload"] == "correctness" and r["metric"] == "mismatches"]
    lines += ["## Correctness (merged tree vs the flattened reference, untimed)", ""]
    rows = [[r["config"], r["impl"], "pass" if r["value"] == 0 else f"FAIL ({r['value']} "
             f"mismatches, see correctness-{r['config']}-{r['impl']}.txt)"] for r in checks]
    lines += [_md_table(["config", "target", "result"], rows), ""]
    disturbed = collections.Counter(r["workload"] for r in records if r.get("caches_dropped"))
    if disturbed:
        lines += ["Runs during which another process dropped the host's caches "
                  "(`/proc/sys/vm/drop_caches`; their warm numbers are really cold): "
                  + ", ".join(f"{w} ({n} records)" for w, n in sorted(disturbed.items())), ""]
    errors = [r for r in records if r["metric"] == "error"]
    if errors:
        lines += ["## Errors", ""]
        seen = set()
        for r in errors:
            if (r["impl"], r["workload"]) not in seen:
                seen.add((r["impl"], r["workload"]))
                count = sum(1 for e in errors
                            if (e["impl"], e["workload"]) == (r["impl"], r["workload"]))
                lines.append(f"- {r['config']} {r['impl']} {r['workload']} "
                             f"({count}x): {r.get('reason')}")
        lines.append("")
    lines += _overview(table)
    lines += requests_section(records)
    for config in table.configs:
        keys = [k for k in table.order if k[0] == config and k[2] != "correctness"]
        if not keys:
            continue
        lines += [f"## {config}", ""]
        groups = []
        for k in keys:
            if k[1] not in groups:
                groups.append(k[1])
        for group in groups:
            gkeys = [k for k in keys if k[1] == group and k[3] not in NOT_RATIOED]
            if not gkeys:
                continue
            present = [i for i in impls if any(table.values.get(k + (i,)) for k in gkeys)]
            lines += [f"### {group}", ""]
            lines.append(_md_table(["workload", "metric"] + present,
                                   [[k[2], k[3]] + [table.cell(k, i) for i in present]
                                    for k in gkeys]))
            lines.append("")
            ratio_rows = []
            bases = [b for b in BASELINES if b in impls]
            for k in gkeys:
                row = [k[2], k[3]]
                for i in present:
                    parts = [table.ratio(k, i, b) for b in bases]
                    row.append(" / ".join("-" if p is None else f"{p:.2f}" for p in parts))
                ratio_rows.append(row)
            lines.append("Ratios (" + " / ".join(f"vs {BASELINE_LABELS[b]}" for b in bases) + "):")
            lines.append("")
            lines.append(_md_table(["workload", "metric"] + present, ratio_rows))
            lines.append("")
            chart = f"chart-{config}-{group}.png"
            if os.path.exists(os.path.join(out_dir, chart)):
                lines += [f"![{group} on {config}]({chart})", ""]
        mem_rows = []
        for i in impls:
            vals = [v for k in keys if k[3] == "server_vmhwm_kib"
                    for v in table.values.get(k + (i,), [])]
            if vals:
                mem_rows.append([i, _fmt(max(vals), "KiB"),
                                 _fmt(statistics.median(vals), "KiB")])
        if mem_rows:
            lines += ["### Server peak memory (VmHWM after each workload)", ""]
            lines += [_md_table(["target", "max", "median"], mem_rows), ""]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return text


def ledger_rows(records):
    """{(config, workload): {impl: {"requests": [per rep], "ops": {OP: [count, timed,
    total_us]}, "complete": bool}}} from the fuse_requests records, in run order."""
    rows = {}
    for r in records:
        if r["metric"] != "fuse_requests":
            continue
        cell = rows.setdefault((r["config"], r["workload"]), {}).setdefault(
            r["impl"], {"requests": [], "ops": {}, "complete": True})
        cell["requests"].append(r["value"])
        cell["complete"] = cell["complete"] and r.get("complete", True)
        for op, e in r.get("ops", {}).items():
            acc = cell["ops"].setdefault(op, [0, 0, 0.0])
            acc[0] += e["count"]
            acc[1] += e.get("timed", 0)
            acc[2] += e.get("total_us", 0.0)
    return rows


def _ops_text(cell):
    reps = len(cell["requests"])
    ops = sorted(cell["ops"].items(), key=lambda kv: -kv[1][0])[:LEDGER_TOP_OPS]
    parts = []
    for op, (count, timed, total_us) in ops:
        mean = f" {total_us / timed:.0f} µs" if timed else ""
        parts.append(f"{op} {count / reps:g}{mean}")
    return ", ".join(parts) + ("" if cell["complete"] else " (trace buffer overflowed)")


def requests_section(records):
    """Markdown: the requests each workload caused, per target and opcode."""
    missing = [r for r in records if r["metric"] == "no-ledger"]
    if missing:
        return ["## FUSE requests", "", f"No request ledger: {missing[0].get('reason')}", ""]
    rows = ledger_rows(records)
    if not rows:
        return []
    present = {i for cells in rows.values() for i in cells}
    impls = [i for i in Table(records).impls if i in present]    # the timing tables' order
    lines = ["## FUSE requests (the kernel's fuse tracepoints)", "",
             "Requests one run of each workload sent to the server (median over repetitions; "
             "mounting, the correctness check and unmounting excluded):", ""]
    lines.append(_md_table(["config", "workload"] + impls,
                           [[c, w] + [f"{statistics.median(cells[i]['requests']):g}"
                                      if i in cells else "-" for i in impls]
                            for (c, w), cells in rows.items()]))
    lines += ["", f"By opcode (mean count per run, mean time from send to answer; "
              f"the {LEDGER_TOP_OPS} most frequent):", ""]
    lines.append(_md_table(["config", "workload", "target", "requests by opcode"],
                           [[c, w, i, _ops_text(cells[i])]
                            for (c, w), cells in rows.items() for i in impls if i in cells]))
    lines.append("")
    return lines


def write_charts(records, out_dir):
    """One PNG per (config, group): ratio to kernel overlayfs, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = Table(records)
    written = []
    for config in table.configs:
        keys, groups = _ratioed_keys(table, config)
        for group in groups:
            gkeys = [k for k in keys if k[1] == group]
            impls = [i for i in table.impls if i != "overlay"
                     and any(table.ratio(k, i, "overlay") for k in gkeys)]
            if not impls:
                continue
            fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(gkeys) + 3.5), 4.2))
            width = 0.8 / len(impls)
            for n, impl in enumerate(impls):
                xs, ys = [], []
                for x, k in enumerate(gkeys):
                    r = table.ratio(k, impl, "overlay")
                    if r:
                        xs.append(x + (n - (len(impls) - 1) / 2) * width)
                        ys.append(r)
                ax.bar(xs, ys, width, label=impl)
            ax.axhline(1.0, color="black", linewidth=0.8, label="overlay (kernel) = 1")
            ax.set_yscale("log")
            ax.set_xticks(range(len(gkeys)))
            ax.set_xticklabels([f"{k[2]}\n{k[3]}" for k in gkeys], fontsize=7,
                               rotation=30 if len(gkeys) > 4 else 0, ha="right"
                               if len(gkeys) > 4 else "center")
            ax.set_ylabel("time / kernel overlayfs (log)")
            ax.set_title(f"{group} ({config}): median ratio to kernel overlayfs, lower is faster",
                         fontsize=9)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.grid(axis="y", which="major", linewidth=0.3)
            fig.tight_layout()
            name = f"chart-{config}-{group}.png"
            fig.savefig(os.path.join(out_dir, name), dpi=90)
            plt.close(fig)
            written.append(name)
    return written


def rerender(out_dir):
    """Rewrite summary.md and the charts of an earlier run from its records."""
    records = load(os.path.join(out_dir, "records.jsonl"))
    with open(os.path.join(out_dir, "run.json")) as f:
        info = json.load(f)
    write_charts(records, out_dir)
    write_summary(records, out_dir, info)


if __name__ == "__main__":  # python -m bench.report OUT_DIR
    import sys
    rerender(sys.argv[1])
