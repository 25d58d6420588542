"""Drive the Cython embedder: python run.py [backend]."""
import sys

import embed_cython

if __name__ == "__main__":
    sys.exit(embed_cython.main(*sys.argv[1:]))
