"""`python -m attnlab` (also what torchrun launches: `torchrun --nproc-per-node K -m attnlab spectrum ...`)."""

from .cli import main

main()
