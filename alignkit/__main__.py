"""``python -m alignkit``: the headless pipeline (see ``alignkit.cli``)."""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
