"""`python -m tfrec_cli ...` = `tfrec ...`."""

import sys

from tfrec_cli.main import main

sys.exit(main())
