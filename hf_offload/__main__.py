"""`python -m hf_offload ...` is the `hf-offload` command."""

import sys

from .cli import main

sys.exit(main())
