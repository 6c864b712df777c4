"""``python -m alignkit``: the headless pipeline (see ``alignkit.cli``)."""

from alignkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
