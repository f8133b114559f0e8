"""``python -m liverseg`` (also what ``torchrun -m liverseg train`` runs)."""

from liverseg.cli import run

if __name__ == "__main__":
    run()
