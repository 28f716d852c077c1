"""`python -m prg_fast ...`: the same command line as the installed `prg-fast`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
