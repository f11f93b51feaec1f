"""`python -m ulframe ...` (and `torchrun ... -m ulframe run FILE.gin`)."""

import sys

from ulframe.cli import main

sys.exit(main())
