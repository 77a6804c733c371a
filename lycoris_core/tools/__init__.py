"""The adapter tools behind `python -m lycoris_core <command>`.

Each command is one module here with `add_command(commands)`: it adds its sub-parser to the
argparse sub-parsers and sets `run=<function(args) -> exit code>` as the parser default. To add a
command, write the module and put its name in COMMANDS (the order of `--help`).
"""
COMMANDS = ("inspect", "info", "merge", "convert", "extract", "resize")
