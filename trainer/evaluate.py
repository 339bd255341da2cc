"""``python -m trainer.evaluate``: the command line of :mod:`trainer.tools.evaluate`."""

import sys

from trainer.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
