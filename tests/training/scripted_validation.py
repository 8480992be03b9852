"""``ami_dist/train.py`` whose validation BLEU, as keep-best and early stopping see it, is scripted by step.

``AMI_TEST_BLEU="2:10,4:20,..."`` gives the forward network's validation BLEU at each validated step; the real
evaluation still runs (and is what MLflow records), only the value the ranking reads is replaced, so that a
test can make the scores rise and fall as it needs.
"""

from __future__ import annotations

import os
import sys

import ami_dist.training.loop as loop
from ami_dist.cli import main

SCRIPT = {int(step): float(value) for step, value in
          (item.split(":") for item in os.environ["AMI_TEST_BLEU"].split(","))}
real_evaluate = loop.evaluate


def scripted_evaluate(run):
    metrics = real_evaluate(run)
    if run.comm.is_main:
        metrics["valid/fw_bleu"] = SCRIPT[run.step]
    return metrics


loop.evaluate = scripted_evaluate
if __name__ == "__main__":
    sys.exit(main())
