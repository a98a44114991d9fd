"""Entry point for `ray job submit -- python ray_job.py ...` and for the demo (`python ray_job.py`).

Thin: spatialnet_dist.train.launch parses --config/--set, validates, launches and prints RESULT last.
"""

import os
import sys

if __name__ == "__main__":
    from spatialnet_dist.train.launch import main

    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo/DeepSpeed atexit hooks can abort a finished run
