"""`python -m arjax.train.cli ...` is `arjax ...`."""

import sys

from arjax.train.cli import main

sys.exit(main())
