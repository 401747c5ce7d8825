"""Ray Jobs entrypoints for her2ray: ``python -m jobs.<stage> --config <yaml>``.

Why a separate package: ``ray job submit --working-dir . -- python -m jobs.pipeline --config ...`` must work
from a plain checkout on any cluster. The modules here only validate a YAML file and turn it into calls of
the ``her2ray`` stage CLI (``her2ray.cli.main``); every bit of science lives in ``her2ray`` itself.

One YAML file describes a whole run (inputs, output root, Ray address, per-stage options); each stage
entrypoint reads the same file and runs only its own stage, so a failed stage can be rerun alone.
"""
