"""``python -m service.cli``: the ``tally`` command."""

import sys

from service.cli import main

if __name__ == "__main__":  # the command runs when executed, never on import
    sys.exit(main())
