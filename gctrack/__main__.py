"""Command line: ``python -m gctrack probe | demo | passes``."""
from __future__ import annotations

import argparse
import sys
import time

import numpy

import gctrack
from gctrack.testing import NativeWriters

MiB = 1 << 20


def cmd_probe(args: argparse.Namespace) -> int:
    print(gctrack.features().table())
    return 0


def demo_patterns(num_pages: int, rng: numpy.random.Generator) -> list[tuple[str, numpy.ndarray]]:
    """Named sets of page numbers to write, one per demo round."""
    return [
        ("one byte", numpy.array([num_pages // 3])),
        ("every 7th page", numpy.arange(0, num_pages, 7)),
        ("one 4 MiB run", numpy.arange(num_pages // 2, num_pages // 2 + 1024)),
        ("random 1 %", numpy.unique(rng.integers(0, num_pages, num_pages // 100))),
        ("all pages", numpy.arange(num_pages)),
        ("nothing", numpy.array([], dtype=numpy.int64)),
    ]


def run_round(tracker, arena, cards, pages: numpy.ndarray) -> tuple:
    """Write one byte into each page, collect one pass, and check the result."""
    view = numpy.asarray(arena)
    view[pages * arena.page_size] += 1
    cards.clear()
    stats = tracker.collect(cards)
    expected = gctrack.CardTable.for_arena(arena, cards.card_size)
    for page in pages.tolist():
        expected.mark_range(arena.address + page * arena.page_size, arena.page_size)
    return stats, cards == expected


def demo_background(tracker, arena, cards, threads: int) -> str:
    """Native writer threads race the background pass loop; drain must see every page."""
    rng = numpy.random.default_rng(1)
    pages = rng.choice(arena.num_pages, size=min(20000, arena.num_pages), replace=False)
    shares = numpy.array_split(pages * arena.page_size, threads)
    cards.clear()
    tracker.start(interval=0.001)
    with NativeWriters(arena, shares, spin=2000):
        pass
    time.sleep(0.005)
    tracker.drain(cards)
    tracker.stop()
    loop = tracker.loop_stats
    got = {int(c) * cards.card_size // arena.page_size for c in cards.indices()}
    missing = len(set(pages.tolist()) - got)
    return (f"background loop: {threads} native writers stored into {len(pages)} pages during "
            f"{loop.passes} passes ({loop.seconds / max(loop.passes, 1) * 1e6:.0f} us each); "
            f"drain reported {len(got)} pages, {missing} missing")


def cmd_passes(args: argparse.Namespace) -> int:
    size = args.size_mib * MiB
    with gctrack.Arena(size) as arena:
        arena.prefault()           # first touch is slow; keep it out of the figures
        with gctrack.Tracker(arena, backend=args.backend) as tracker:
            cards = gctrack.CardTable.for_arena(arena, args.card_size)
            print(f"gctrack demo: {args.size_mib} MiB arena ({arena.num_pages} pages), backend "
                  f"{tracker.backend}, {cards.card_size} B cards")
            print(f"{'pattern':<16}{'written':>9}{'reported':>10}{'regions':>9}{'calls':>7}"
                  f"{'cards':>9}{'pass ms':>9}  exact")
            all_exact = True
            for name, pages in demo_patterns(arena.num_pages, numpy.random.default_rng(0)):
                stats, exact = run_round(tracker, arena, cards, pages)
                all_exact &= exact
                print(f"{name:<16}{len(pages):>9}{stats.pages:>10}{stats.regions:>9}"
                      f"{stats.calls:>7}{cards.count():>9}{stats.seconds * 1e3:>9.3f}  "
                      f"{'yes' if exact else 'NO'}")
            print(demo_background(tracker, arena, cards, threads=2))
    return 0 if all_exact else 1


def print_cycle(number: int, stats, full_mark: float) -> None:
    passes = ", ".join(f"{p.dirty_cards} cards/{p.rescanned} rescanned" for p in stats.preclean)
    print(f"cycle {number}: live {stats.live:,}, freed {stats.freed:,}; concurrent mark "
          f"{stats.concurrent_mark_seconds * 1e3:.1f} ms; precleaning [{passes}]; remark pause "
          f"{stats.remark_pause * 1e3:.3f} ms over {stats.remark_dirty_cards} dirty cards "
          f"(initial-mark pause {stats.initial_mark_pause * 1e3:.3f} ms); stop-the-world full mark "
          f"{full_mark * 1e3:.1f} ms: remark is {stats.remark_pause / full_mark:.2%} of it")


def cmd_demo(args: argparse.Namespace) -> int:
    """A GC demonstration: concurrent cycles under native mutators."""
    from gctrack.mutator import populate

    with gctrack.Heap(args.heap_mib * MiB, backend=args.backend, card_size=args.card_size) as heap:
        made = populate(heap, int(heap.num_objects * 0.75), garbage=0.2)
        collector = gctrack.Collector(heap)
        print(f"gctrack GC demo: {args.heap_mib} MiB heap of {heap.num_objects:,} objects "
              f"({made:,} allocated, about 20 % garbage), backend {heap.backend}, "
              f"{args.threads} native mutators at {args.rate:,.0f} operations/s each")
        first = collector.collect(concurrent=False)
        print(f"warm-up stop-the-world cycle: full mark {first.full_mark_seconds * 1e3:.1f} ms, "
              f"freed {first.freed:,}")
        with gctrack.NativeMutators(heap, threads=args.threads, rate=args.rate) as mutators:
            for number in range(1, args.cycles + 1):
                time.sleep(args.pause)
                stats = collector.collect()
                full_mark = collector.collect(concurrent=False).full_mark_seconds
                print_cycle(number, stats, full_mark)
            totals = mutators.stats()
        print(f"mutators: {totals['stores']:,} stores, {totals['allocations']:,} allocations, "
              f"{totals['root_changes']:,} root changes, {totals['violations']} violations")
    return 1 if totals["violations"] else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gctrack import bench

    results, missing = bench.run(bench.QUICK if args.quick else bench.FULL)
    print(bench.table(results, missing))
    for path in bench.write_outputs(results, missing, Path(args.out)):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gctrack", description=gctrack.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="what this kernel supports, and why not").set_defaults(run=cmd_probe)
    demo = sub.add_parser("demo", help="mostly-concurrent GC cycles under native mutators")
    demo.add_argument("--heap-mib", type=int, default=256, help="heap size (default 256)")
    demo.add_argument("--backend", default="auto", help="backend name (default auto)")
    demo.add_argument("--card-size", type=int, default=512, help="card size in bytes (default 512)")
    demo.add_argument("--threads", type=int, default=2, help="native mutator threads (default 2)")
    demo.add_argument("--rate", type=float, default=50000,
                      help="mutator operations per second per thread; 0: unthrottled (default 50000)")
    demo.add_argument("--cycles", type=int, default=3, help="concurrent cycles (default 3)")
    demo.add_argument("--pause", type=float, default=0.2, help="seconds between cycles (default 0.2)")
    demo.set_defaults(run=cmd_demo)
    passes = sub.add_parser("passes", help="tracking passes over write patterns")
    passes.add_argument("--size-mib", type=int, default=256, help="arena size (default 256)")
    passes.add_argument("--backend", default="auto", help="backend name (default auto)")
    passes.add_argument("--card-size", type=int, default=512, help="card size in bytes (default 512)")
    passes.set_defaults(run=cmd_passes)
    bench_parser = sub.add_parser("bench", help="compare every backend: table, JSON, CSV, plots")
    bench_parser.add_argument("--quick", action="store_true", help="a sweep under a minute")
    bench_parser.add_argument("--out", default="gctrack-bench", help="output folder")
    bench_parser.set_defaults(run=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (gctrack.TrackerError, ValueError) as exc:
        print(f"gctrack: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
