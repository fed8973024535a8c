"""Training recipes, installed as `effllm.recipes`: each module defines `config() -> TrainConfig`.

Run one with `effllm train <name>` (overrides: `--field value`), or `python recipes/<name>.py`.
"""
