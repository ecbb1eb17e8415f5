"""``python -m incremental`` (also what ``torchrun -m incremental`` runs)."""
import sys

from .cli import main

sys.exit(main())
