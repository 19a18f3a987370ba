"""`python -m djinn keys DIR [--name NAME]`: the `djinn` command (djinn/cli.py)."""
import sys

from .cli import main

sys.exit(main())
