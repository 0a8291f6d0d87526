"""``python -m scvi_fast.cli``: the ``scvi-fast`` command."""

import sys

from scvi_fast.cli import main

sys.exit(main())
