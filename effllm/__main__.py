"""`python -m effllm` runs the `effllm` command."""

import sys

from effllm.cli import main

sys.exit(main())
