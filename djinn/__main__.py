"""`python -m djinn keys DIR [--name NAME]`, `python -m djinn top [ADDRESS]`: the `djinn` command (djinn/cli.py)."""
import sys

from .cli import main

sys.exit(main())
