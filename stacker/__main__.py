"""``python -m stacker`` runs the command line."""

import sys

from stacker.app.cli import main

sys.exit(main())
