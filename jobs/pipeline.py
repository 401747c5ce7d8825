"""`python -m jobs.pipeline --config RUN.yaml`: run every stage listed in the YAML, in pipeline order.

Submit to any Ray cluster with
``ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/local.yaml``;
inside the job the stages attach to that cluster through ``RAY_ADDRESS``.
"""

import sys

from jobs._common import job_main

if __name__ == "__main__":
    sys.exit(job_main(None))
