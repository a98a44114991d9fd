"""Entry point for `ray job submit -- python ray_job.py ...` and for the demo (`python ray_job.py`).

Thin: spatialnet_dist.jobs.train_with_ray (train/launch.py) parses --config/--set, validates, launches and
prints RESULT last.
"""

import os
import sys

if __name__ == "__main__":
    from spatialnet_dist.jobs import train_with_ray

    code = train_with_ray(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo/DeepSpeed atexit hooks can abort a finished run
