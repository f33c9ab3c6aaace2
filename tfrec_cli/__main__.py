"""`python -m tfrec_cli ...` = `tfrec ...`."""

import sys

from tfrec_cli.main import main

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
    sys.exit(main())
