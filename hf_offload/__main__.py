"""`python -m hf_offload ...` is the `hf-offload` command."""

import sys

from .commands.cli import main

sys.exit(main())
