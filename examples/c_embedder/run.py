"""Drive the C embedder: python run.py [backend]."""
import sys

import gctrack

import embed_c


def main(backend="auto", objects=20000, stride=97):
    with gctrack.Arena(objects * 64) as arena, gctrack.Tracker(arena, backend=backend) as tracker:
        cards = gctrack.CardTable.for_arena(arena, card_size=64)
        dirty = embed_c.mutate_and_collect(arena, tracker, cards, stride)
        written = range(0, objects, stride)
        missing = set(written) - set(dirty)
        print(f"c embedder, {tracker.backend}: {len(written)} objects written, "
              f"{len(dirty)} cards dirty, {len(missing)} missing")
        return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
