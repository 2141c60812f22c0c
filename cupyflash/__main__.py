"""``python -m cupyflash ...``: the ``cupyflash`` command (cupyflash/cli.py)."""
from .cli import main

main(prog_name="cupyflash")
