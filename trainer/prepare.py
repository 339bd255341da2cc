"""``python -m trainer.prepare``: the command line of :mod:`trainer.tools.prepare`."""

import sys

from trainer.tools.prepare import main

if __name__ == "__main__":
    sys.exit(main())
