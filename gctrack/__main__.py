"""Command line: ``gctrack probe | demo | passes | verify-demo | bench`` (or ``python -m gctrack ...``)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy

import gctrack
from gctrack.cards import MAX_CARD_SIZE
from gctrack.testing import NativeWriters, store_bytes

MiB = 1 << 20
#: The exit status after Ctrl-C, as shells report a SIGINT death.
INTERRUPTED = 130


def cmd_probe(args: argparse.Namespace) -> int:
    print(gctrack.features().table())
    return 0


def demo_patterns(num_pages: int, page_size: int,
                  rng: numpy.random.Generator) -> list[tuple[str, numpy.ndarray]]:
    """Named sets of page numbers to write, one per round; any arena size works."""
    run = max(1, min(1024, num_pages // 2))
    return [
        ("one byte", numpy.array([num_pages // 3])),
        ("every 7th page", numpy.arange(0, num_pages, 7)),
        (f"one {run * page_size // 1024} KiB run", numpy.arange(num_pages // 2, num_pages // 2 + run)),
        ("random 1 %", numpy.unique(rng.integers(0, num_pages, max(1, num_pages // 100)))),
        ("all pages", numpy.arange(num_pages)),
        ("nothing", numpy.array([], dtype=numpy.int64)),
    ]


def run_round(tracker, arena, cards, pages: numpy.ndarray) -> tuple:
    """Store one byte into each page (through the barrier on ``software``),
    collect one pass, and check the result against what was stored."""
    offsets = pages.astype(numpy.uint64) * arena.page_size
    store_bytes(arena, offsets, tracker)
    cards.clear()
    stats = tracker.collect(cards)
    expected = gctrack.CardTable.for_arena(arena, cards.card_size)
    unit = tracker.granularity                     # what one report stands for
    for offset in offsets.tolist():
        expected.mark_range(arena.address + offset // unit * unit, unit)
    return stats, cards == expected


def demo_background(tracker, arena, cards, threads: int) -> str:
    """Native writer threads race the background pass loop; drain must see every page."""
    if tracker.backend == "software":
        return "background loop: not shown for software (the native writers call no barrier)"
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
            print(f"gctrack passes: {args.size_mib} MiB arena ({arena.num_pages} pages), backend "
                  f"{tracker.backend}, {cards.card_size} B cards")
            print(f"{'pattern':<16}{'written':>9}{'reported':>10}{'regions':>9}{'calls':>7}"
                  f"{'cards':>9}{'pass ms':>9}  exact")
            all_exact = True
            for name, pages in demo_patterns(arena.num_pages, arena.page_size,
                                             numpy.random.default_rng(0)):
                stats, exact = run_round(tracker, arena, cards, pages)
                all_exact &= exact
                print(f"{name:<16}{len(pages):>9}{stats.pages:>10}{stats.regions:>9}"
                      f"{stats.calls:>7}{cards.count():>9}{stats.seconds * 1e3:>9.3f}  "
                      f"{'yes' if exact else 'NO'}")
            print(demo_background(tracker, arena, cards, threads=2))
    return 0 if all_exact else 1


CYCLE_COLUMNS = (("cycle", 5), ("live", 11), ("freed", 10), ("mark ms", 8),
                 ("preclean cards", 20), ("remark ms", 10), ("dirty", 7), ("init ms", 8),
                 ("TTSP µs", 13), ("sweep ms", 9), ("STW ms", 8), ("remark/STW", 11))


def cycle_header() -> str:
    return "".join(f"{name:>{width}}" for name, width in CYCLE_COLUMNS)


def cycle_row(number: int, stats, full_mark: float) -> str:
    """One concurrent cycle, beside a stop-the-world full mark of the same heap."""
    preclean = ">".join(str(p.dirty_cards) for p in stats.preclean) or "-"
    cells = (number, f"{stats.live:,}", f"{stats.freed:,}",
             f"{stats.concurrent_mark_seconds * 1e3:.1f}", preclean,
             f"{stats.remark_pause * 1e3:.3f}", stats.remark_dirty_cards,
             f"{stats.initial_mark_pause * 1e3:.3f}",
             f"{stats.initial_mark_time_to_safepoint * 1e6:.0f}/{stats.remark_time_to_safepoint * 1e6:.0f}",
             f"{stats.sweep_seconds * 1e3:.1f}", f"{full_mark * 1e3:.1f}",
             f"{stats.remark_pause / full_mark:.2%}")
    return "".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, CYCLE_COLUMNS))


def cmd_demo(args: argparse.Namespace) -> int:
    """A GC demonstration: concurrent cycles under native mutators."""
    from gctrack.mutator import populate

    interrupted = False
    with gctrack.Heap(args.heap_mib * MiB, backend=args.backend, card_size=args.card_size) as heap:
        made = populate(heap, int(heap.num_objects * 0.75), garbage=0.2)
        collector = gctrack.Collector(heap)
        print(f"gctrack demo: {args.heap_mib} MiB heap of {heap.num_objects:,} objects "
              f"({made:,} allocated, about 20 % garbage), backend {heap.backend}, "
              f"{args.threads} native mutators at {args.rate:,.0f} operations/s each")
        first = collector.collect(concurrent=False)
        print(f"warm-up stop-the-world cycle: full mark {first.full_mark_seconds * 1e3:.1f} ms, "
              f"freed {first.freed:,}")
        print("TTSP: time to safepoint of the initial mark / of the remark; "
              "the sweep runs beside the mutators")
        print(cycle_header())
        with gctrack.NativeMutators(heap, threads=args.threads, rate=args.rate) as mutators:
            try:
                for number in range(1, args.cycles + 1):
                    time.sleep(args.pause)
                    stats = collector.collect()
                    full_mark = collector.collect(concurrent=False).full_mark_seconds
                    print(cycle_row(number, stats, full_mark), flush=True)
            except KeyboardInterrupt:
                interrupted = True
            totals = mutators.stats()
        print(f"mutators: {totals['stores']:,} stores, {totals['allocations']:,} allocations, "
              f"{totals['root_changes']:,} root changes, {totals['violations']} violations")
    if interrupted:
        print("interrupted: the cycles above finished", file=sys.stderr)
        return INTERRUPTED
    return 1 if totals["violations"] else 0


def cmd_verify_demo(args: argparse.Namespace) -> int:
    """A mutator with one deliberately missing barrier, found and reported."""
    from gctrack.testing import store_words

    rng = numpy.random.default_rng(args.seed)
    with gctrack.Arena(args.size_mib * MiB) as arena:
        arena.prefault()
        cards = gctrack.CardTable.for_arena(arena, args.card_size)   # the runtime's card table
        words = arena.size // 8
        with gctrack.BarrierVerifier(arena, cards) as verifier:
            print(f"gctrack verify-demo: {args.size_mib} MiB arena, {args.card_size} B cards, "
                  f"{args.threads} native threads storing {args.stores:,} words a round, "
                  "each followed by the card-marking barrier")
            found_exactly = True
            for number in range(1, args.rounds + 1):
                offsets = rng.choice(words, args.stores, replace=False).astype(numpy.uint64) * 8
                values = rng.integers(1, 2**63, args.stores, dtype=numpy.uint64)
                store_words(arena, offsets, values, cards, threads=args.threads)
                planted = None
                if number == args.rounds:          # the bug: one store skips its barrier
                    planted = int(rng.integers(0, words)) * 8
                    while cards.is_dirty(arena.address + planted):
                        planted = int(rng.integers(0, words)) * 8
                    store_words(arena, [planted], [0xBAD])
                report = verifier.check()          # at the safepoint: every thread has stopped
                print(f"round {number}: {report.pages_written:,} pages written, "
                      f"{report.words_changed:,} words changed, {report.missed_count} missed, "
                      f"check {report.seconds * 1e3:.2f} ms")
                for address, old, new in report.missed.tolist():
                    print(f"  missed barrier: store to {address:#x} (arena offset "
                          f"{address - arena.address:#x}, card "
                          f"{(address - cards.base) // cards.card_size}): {old:#x} -> {new:#x}")
                expected = [] if planted is None else [arena.address + planted]
                found_exactly &= report.missed["address"].tolist() == expected
    print("found exactly the planted miss" if found_exactly else "MISMATCH against the planted miss")
    return 0 if found_exactly else 1


def cmd_bench_gc(args: argparse.Namespace) -> int:
    from gctrack import harness

    interrupted, failed = harness.main(args, [program_name(), *sys.argv[1:]])
    if interrupted:
        print("interrupted: the results above are the runs that finished", file=sys.stderr)
        return INTERRUPTED
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gctrack import bench

    sweep = bench.QUICK if args.quick else bench.FULL
    results, missing, interrupted = bench.run(sweep)
    print(bench.table(results, missing))
    if results:
        for path in bench.write_outputs(results, missing, Path(args.out), sweep):
            print(f"wrote {path}")
    if interrupted:
        print("interrupted: the results above are the cells that finished", file=sys.stderr)
        return INTERRUPTED
    return 0


def program_name() -> str:
    """What the user typed: ``gctrack`` for the installed script, else ``python -m gctrack``."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m gctrack" if base in ("", "__main__.py", "-c") else base


def checked(kind, test, meaning: str):
    """An argparse type: ``kind`` of the text, refused unless ``test`` holds."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {meaning}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {meaning}")
        return value
    parse.__name__ = meaning
    return parse


POSITIVE = checked(int, lambda v: v > 0, "a positive whole number")
NOT_NEGATIVE = checked(float, lambda v: v >= 0 and v != float("inf"), "a number >= 0")
CARD_SIZE = checked(int, lambda v: 64 <= v <= MAX_CARD_SIZE and v & (v - 1) == 0,
                    "a power of two from 64 to 2**63")
BACKEND_CHOICES = ("auto", *gctrack.BACKENDS)


def add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="tracking mechanism: %(choices)s (default auto: the best one here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description=gctrack.__doc__)
    parser.add_argument("--version", action="version", version=f"gctrack {gctrack.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    probe = sub.add_parser("probe", help="what this kernel supports, and why not",
                           description="Prove each backend in a child process and print, for "
                                       "every mechanism, whether it works here and why not.")
    probe.set_defaults(run=cmd_probe)
    demo = sub.add_parser("demo", help="mostly-concurrent GC cycles under native mutators",
                          description="Fill a heap, start native mutator threads, and run "
                                      "mostly-concurrent collection cycles. Each row shows one "
                                      "cycle beside a stop-the-world full mark of the same heap.")
    demo.add_argument("--heap-mib", type=POSITIVE, default=256, help="heap size (default 256)")
    add_backend(demo)
    demo.add_argument("--card-size", type=CARD_SIZE, default=512, help="card size in bytes (default 512)")
    demo.add_argument("--threads", type=POSITIVE, default=2, help="native mutator threads (default 2)")
    demo.add_argument("--rate", type=NOT_NEGATIVE, default=50000,
                      help="mutator operations per second per thread; 0: unthrottled (default 50000)")
    demo.add_argument("--cycles", type=POSITIVE, default=3, help="concurrent cycles (default 3)")
    demo.add_argument("--pause", type=NOT_NEGATIVE, default=0.2,
                      help="seconds between cycles (default 0.2)")
    demo.set_defaults(run=cmd_demo)
    passes = sub.add_parser("passes", help="tracking passes over write patterns",
                            description="Write known patterns into an arena, run one pass each, "
                                        "and check that exactly the written cards come back.")
    passes.add_argument("--size-mib", type=POSITIVE, default=256, help="arena size (default 256)")
    add_backend(passes)
    passes.add_argument("--card-size", type=CARD_SIZE, default=512,
                        help="card size in bytes (default 512)")
    passes.set_defaults(run=cmd_passes)
    verify = sub.add_parser("verify-demo", help="a missing write barrier, found by the kernel",
                            description="Native threads store into an arena, each store followed "
                                        "by a card-marking barrier; in the last round one store "
                                        "skips it. A BarrierVerifier checks at every round's "
                                        "safepoint and reports the store: address, old, new.")
    verify.add_argument("--size-mib", type=POSITIVE, default=64, help="arena size (default 64)")
    verify.add_argument("--card-size", type=CARD_SIZE, default=512,
                        help="card size in bytes (default 512)")
    verify.add_argument("--threads", type=POSITIVE, default=2, help="storing threads (default 2)")
    verify.add_argument("--stores", type=POSITIVE, default=2000, help="stores a round (default 2000)")
    verify.add_argument("--rounds", type=POSITIVE, default=3, help="rounds (default 3)")
    verify.add_argument("--seed", type=int, default=14, help="random seed (default 14)")
    verify.set_defaults(run=cmd_verify_demo)
    add_bench(sub)
    return parser


PASSES_DESCRIPTION = (
    "Measure every backend's first-write cost and one collect + re-arm, against arena size and "
    "dirty fraction. The full sweep takes about 2-3 minutes and about 4.2 GB of resident memory "
    "(its largest arena is 4 GiB); --quick takes under a minute and about 0.4 GB. Plots need "
    "matplotlib: pip install 'gctrack[plots]'.")


def add_bench_passes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a sweep under a minute")
    parser.add_argument("--out", default="gctrack-bench", help="output folder")
    parser.set_defaults(run=cmd_bench)


def add_bench(sub) -> None:
    """``bench`` (the same as ``bench passes``), ``bench passes`` and ``bench gc``."""
    from gctrack import harness

    bench_parser = sub.add_parser(
        "bench", help="compare every backend: passes (the default) or GC runs",
        description=f"bench passes (the default): {PASSES_DESCRIPTION} bench gc: the research "
                    "harness, workloads on the collector with every backend.")
    add_bench_passes_options(bench_parser)
    kinds = bench_parser.add_subparsers(dest="bench", metavar="{passes,gc}")
    add_bench_passes_options(kinds.add_parser(
        "passes", help="first-write and pass cost against arena size and dirty fraction",
        description=PASSES_DESCRIPTION))
    gc = kinds.add_parser(
        "gc", help="workloads on the collector with every backend: pauses, MMU, throughput",
        description="Run each workload's native mutators on a heap with each backend, and with "
                    "an untracked stop-the-world baseline, and report pause percentiles with "
                    "time to safepoint, minimum mutator utilisation, throughput against the "
                    "baseline, CPU time, minor faults and the precision of the reported cards. "
                    "Writes results.json and results.csv after every run (Ctrl-C keeps what is "
                    "done) and PNG plots when matplotlib is installed (pip install "
                    "'gctrack[plots]'). --quick takes under a minute on 2 cores.")
    gc.add_argument("--workload", action="append", choices=harness.WORKLOADS,
                    help="a workload to run, repeatable (default: all of %(choices)s)")
    gc.add_argument("--backend", action="append", choices=harness.GC_BACKENDS,
                    help="a backend to run, repeatable (default: every one available of "
                         "%(choices)s); the untracked baseline always runs")
    gc.add_argument("--quick", action="store_true",
                    help="a small heap and short runs: under a minute on 2 cores")
    gc.add_argument("--repeat", type=POSITIVE, default=1,
                    help="runs of each setting; medians with confidence intervals (default 1)")
    gc.add_argument("--out", default="gctrack-bench-gc", help="output folder")
    gc.add_argument("--heap-mib", type=POSITIVE, help="heap size (default 256; 32 with --quick)")
    gc.add_argument("--seconds", type=checked(float, lambda v: 0 < v < float("inf"),
                                              "a positive number of seconds"),
                    help="each run's measured time (default 4; 0.6 with --quick)")
    gc.add_argument("--threads", type=POSITIVE, help="mutator threads (default 2)")
    gc.add_argument("--sweep", type=NOT_NEGATIVE, nargs="+", metavar="RATIO",
                    help="gcold's old_store_ratio values, stores into the old tree per "
                         "short-lived object (default: "
                         f"{' '.join(f'{r:g}' for r in harness.FULL.sweep)}; "
                         f"{' '.join(f'{r:g}' for r in harness.QUICK.sweep)} with --quick)")
    gc.set_defaults(run=cmd_bench_gc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (gctrack.TrackerError, ValueError) as exc:
        print(f"gctrack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
