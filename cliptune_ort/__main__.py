"""``python -m cliptune_ort ARGS`` = ``cliptune ARGS``."""

import sys

from cliptune_ort.cli import main

if __name__ == "__main__":
    sys.exit(main())
