"""``python -m trainer.export``: the command line of :mod:`trainer.tools.export`."""

import sys

from trainer.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
