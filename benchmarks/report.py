"""Markdown tables for README's Results, from a pytest-benchmark JSON file.

    python -m pytest benchmarks --benchmark-json results.json
    python benchmarks/report.py results.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

BACKENDS = ["pagemap_scan", "mprotect", "uffd_sync", "soft_dirty", "software"]


def duration(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e9:.3g} ns"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def by_group(benchmarks) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        impl = (bench.get("params") or {}).get("impl") or bench["name"]
        groups[bench["group"] or ""][impl] = bench
    return groups


def median(bench) -> float:
    return bench["stats"]["median"]


def pass_table(groups) -> str:
    rows = []
    for group, impls in groups.items():
        if group.startswith("pass ") and {"gctrack", "raw_c"} <= impls.keys():
            ours, raw = median(impls["gctrack"]), median(impls["raw_c"])
            rows.append([group[5:], duration(ours), duration(raw), f"{ours / raw:.2f}"])
    return table(["arena, pages written", "gctrack collect()", "raw C pass", "ratio"], rows)


def first_write_table(groups) -> str:
    impls = next(v for g, v in groups.items() if g.startswith("first write"))
    reference = median(impls["pagemap_scan"]) / impls["pagemap_scan"]["extra_info"]["pages"]
    rows = []
    for impl, bench in impls.items():
        per_page = median(bench) / bench["extra_info"]["pages"]
        rows.append([impl, duration(per_page), f"{per_page / reference:.2f}"])
    return table(["backend", "first write, per page", "ratio to pagemap_scan"], rows)


def collect_table(groups) -> str:
    present = [b for b in ["raw_c"] + BACKENDS
               if any(b in v for g, v in groups.items() if g.startswith("collect "))]
    rows = []
    for group, impls in groups.items():
        if not group.startswith("collect ") or "pagemap_scan" not in impls:
            continue
        reference = median(impls["pagemap_scan"])
        row = [group[8:].replace(" written", "")]
        for impl in present:
            row.append(f"{duration(median(impls[impl]))} ({median(impls[impl]) / reference:.2f})"
                       if impl in impls else "—")
        rows.append(row)
    return table(["arena, pages written"] + [f"{p} (ratio)" for p in present], rows)


def cards_table(groups) -> str:
    rows = []
    for group, impls in groups.items():
        if group.startswith("regions to cards"):
            for name, bench in impls.items():
                info = bench["extra_info"]
                rows.append([group.split(", ")[1], name.split("[")[1].rstrip("]"),
                             duration(median(bench)),
                             f"{info['regions'] / median(bench) / 1e6:.1f} M regions/s",
                             f"{info['bytes'] / median(bench) / 2**30:.0f} GiB/s"])
    return table(["pattern", "case", "add_regions", "regions", "address space"], rows)


def loop_table(groups) -> str:
    impls = next(v for g, v in groups.items() if g.startswith("mutator under"))
    base = median(impls["untracked"])
    stores = impls["untracked"]["extra_info"]["stores"]
    return table(["mutator beside", f"{stores} stores", "per store", "ratio to untracked"],
                 [[impl, duration(median(b)), duration(median(b) / stores),
                   f"{median(b) / base:.2f}"] for impl, b in impls.items()])


def gc_table(benchmarks) -> str:
    rows = []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "remark_pause_ms" in info:
            rows.append([bench["params"]["impl"], f"{info['remark_pause_ms']:.3f} ms",
                         f"{info['full_mark_ms']:.1f} ms", f"{info['remark_over_full_mark']:.2%}",
                         f"{info['initial_mark_pause_ms'] * 1e3:.1f} µs",
                         f"{info['concurrent_mark_ms']:.1f} ms",
                         f"{info['mutator_stores_per_second']:,.0f}"])
    return table(["backend", "remark pause", "stop-the-world full mark", "remark / full mark",
                  "initial-mark pause", "concurrent mark", "mutator stores/s"], rows)


def main(path: str) -> None:
    data = json.load(open(path))
    groups = by_group(data["benchmarks"])
    sections = [("collect() against the raw C pass (test_pass.py)", pass_table(groups)),
                ("First write after a pass (test_backends.py)", first_write_table(groups)),
                ("One collect + re-arm (test_backends.py)", collect_table(groups)),
                ("Regions to card bits (test_cards.py)", cards_table(groups)),
                ("A mutator beside the background loop (test_loop_cost.py)", loop_table(groups)),
                ("GC cycle on a 1 GiB heap, ~10^5 stores/s (test_gc.py)", gc_table(data["benchmarks"]))]
    for title, body in sections:
        print(f"#### {title}\n\n{body}\n")


if __name__ == "__main__":
    main(sys.argv[1])
