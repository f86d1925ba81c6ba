"""``python -m service.cli``: the ``tally`` command."""

import sys

from service.cli import main

sys.exit(main())
