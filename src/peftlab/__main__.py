"""``python -m peftlab``: the same as the ``peftlab`` command."""

import sys

from peftlab.cli import main

sys.exit(main())
