"""``python -m retain``: the command line; several processes start it the same way
(``accelerate launch --num_processes N -m retain train RUN.yaml`` on GPUs,
``torchrun --nproc_per_node N -m retain train RUN.yaml`` on CPUs)."""

from retain.cli import main

main()
