"""Launch the FLUID demo: ``python app.py`` (same options as ``fluid demo``)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fluid_app.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
