"""Offline fine-tuning of DTEM's heads on the digits ViT, under the benchmark's name: the study is
the library's (:mod:`tomec.digits_dtem`, the ``tomec finetune dtem`` command).

    python -m tomec.bench.finetune_dtem [--seeds 10] [--steps 150] [--distill]
"""

from tomec.cli_args import run_command
from tomec.digits_dtem import BATCH, HEADS, LR, RESULT_FILE, SCHEDULE, SEEDS, STEPS, evaluate, main, run

__all__ = ["BATCH", "HEADS", "LR", "RESULT_FILE", "SCHEDULE", "SEEDS", "STEPS", "evaluate", "main", "run"]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
