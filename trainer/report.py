"""``python -m trainer.report``: the command line of :mod:`trainer.tools.report`."""

import sys

from trainer.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
