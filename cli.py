"""``python cli.py ...`` in a checkout: the ``cupyflash`` command (cupyflash/cli.py)."""
from cupyflash.cli import main

if __name__ == "__main__":
    main()
