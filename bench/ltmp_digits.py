"""LTMP on the digits ViT, under the benchmark's name: the study is the library's
(:mod:`tomec.digits_ltmp`, the ``tomec finetune ltmp`` command).

    python -m tomec.bench.ltmp_digits
"""

from tomec.cli_args import run_command
from tomec.digits_ltmp import THRESHOLDS, compiled_accuracy, main, tome_equal_flops

__all__ = ["THRESHOLDS", "compiled_accuracy", "main", "tome_equal_flops"]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
