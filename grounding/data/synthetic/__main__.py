"""Entry point of ``python -m grounding.data.synthetic`` (see :mod:`grounding.data.synthetic.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
