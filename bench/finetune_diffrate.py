"""DiffRate's schedule search on the digits ViT, under the benchmark's name: the study is the
library's (:mod:`tomec.digits_diffrate`, the ``tomec finetune diffrate`` command).

    python -m tomec.bench.finetune_diffrate
"""

from tomec.cli_args import run_command
from tomec.digits_diffrate import RESULTS, RHOS, SEEDS, STEPS, geometric_kept, main, run

__all__ = ["RESULTS", "RHOS", "SEEDS", "STEPS", "geometric_kept", "main", "run"]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
