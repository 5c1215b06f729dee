"""The offline study on the digits ViT, under the benchmark's name: the data, the model, the shipped
checkpoint and the study are the library's (:mod:`tomec.digits`, the ``tomec digits`` command);
:data:`RESULTS` (``bench/results/``) holds the shipped study results.

    python -m tomec.bench.digits study --out DIR      # the same as: tomec digits study --out DIR
"""

from tomec.cli_args import run_command
from tomec.digits import (
    ACCURACY_BOUND,
    CHECKPOINT,
    COMPILER_LABELS,
    DATA,
    MIN_UNMERGED_ACCURACY,
    MODERATE_R,
    RESULTS,
    accuracy_of,
    digits_data,
    digits_model,
    load_trained,
    main,
    over_seeds,
    pareto_plot,
    scores_of,
    study,
    train,
    write_result,
)

__all__ = [
    "ACCURACY_BOUND", "CHECKPOINT", "COMPILER_LABELS", "DATA", "MIN_UNMERGED_ACCURACY", "MODERATE_R", "RESULTS",
    "accuracy_of", "digits_data", "digits_model", "load_trained", "main", "over_seeds", "pareto_plot", "scores_of",
    "study", "train", "write_result",
]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
