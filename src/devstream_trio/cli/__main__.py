"""``python -m devstream_trio.cli``: the ``devstream`` command."""

import sys

from . import main

sys.exit(main())
