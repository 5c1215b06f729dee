"""Accuracy on an ImageNet-style folder: the unmerged model and a merged one, in one run.

The evaluation is the library's (:mod:`tomec.evaluate`, the ``tomec eval`` command); this script
keeps the benchmark's name for it, under ``torchrun`` too:

    torchrun --standalone --nproc_per_node 8 -m tomec.bench.accuracy --data ... --reduce 100 --out results.json
"""

from tomec.cli_args import run_command
from tomec.evaluate import ClassCountWarning, ExactDistributedSampler, evaluate, main
from tomec.models import load_model

__all__ = ["load_model", "ExactDistributedSampler", "ClassCountWarning", "evaluate", "main"]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
