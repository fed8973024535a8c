"""`python -m effllm` runs the `effllm` command."""

import sys

from effllm.cli import console

sys.exit(console())
