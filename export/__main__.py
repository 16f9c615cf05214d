"""``python -m cliptune_export MODEL --out DIR``: the export step in its own process.

The tuner calls this in a subprocess so that a tune process never imports torch.
"""

import sys

from cliptune_ort.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
