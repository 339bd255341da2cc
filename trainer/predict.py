"""``python -m trainer.predict``: the command line of :mod:`trainer.tools.predict`."""

import sys

from trainer.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
