"""`python -m gpu_worker serve ...` / `python -m gpu_worker profile ...`: the npc-worker command line."""

import sys

from gpu_worker.worker import main

sys.exit(main())
