"""`python -m effllm` runs the `effllm` command."""

from effllm.cli import console

console()
