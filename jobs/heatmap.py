"""`python -m jobs.heatmap --config RUN.yaml`: run only the ``her2ray heatmap`` stage of a run YAML.

Same YAML as ``jobs.pipeline``; inputs come from the outputs of the earlier stages under ``out``.
"""

import sys

from jobs._common import job_main

if __name__ == "__main__":
    sys.exit(job_main("heatmap"))
