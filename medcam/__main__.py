"""``python -m medcam`` (e.g. ``torchrun --nproc_per_node=2 -m medcam cohort run ...``)."""

from medcam.cli import main

main()
