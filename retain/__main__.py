"""``python -m retain``: the command line (also ``accelerate launch -m retain train RUN.yaml``)."""

from retain.cli import main

main()
