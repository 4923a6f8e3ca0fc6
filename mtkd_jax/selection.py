"""Which epoch of a stage the run keeps: the last one, or the best by an evaluation.

`--epoch_selection` chooses the criterion:

* `last` (the default): the weights after the last epoch; nothing is evaluated for the choice.
* `val`: the best accuracy on the few-shot validation images of the stage's labeled classes
  (min(K, 4) per class from the dataset's validation split, never trained on): an honest
  choice, made without test images.
* `test_base`: the best accuracy on the test images of the base classes, as the authors'
  code does (Dassl's `best_val` with the base half of the test split as its "val" set). This
  selects on test images: the reported base accuracy is then optimistic, and novel is reported
  from the epoch that did best on base.

`EpochSelector` keeps the best epoch's variables on the host and, so that a resumed run
chooses among all epochs, also in `<workdir>/<stage>_best_epoch.npz` (atomically).
"""

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mtkd_jax import atomic, distributed
from mtkd_jax import workdir as workdir_lib

CRITERIA = ("last", "val", "test_base")


class EpochSelector:
    """Keeps the variables of the best epoch of one stage by one criterion.

    Args:
      criterion: one of `CRITERIA` other than "last".
      stage: the stage name (e.g. "stage2"), for the file name and messages.
      workdir: where `<stage>_best_epoch.npz` goes.
    """

    def __init__(self, criterion: str, stage: str, workdir: Path):
        if criterion not in CRITERIA[1:]:
            raise ValueError(
                f"An EpochSelector needs one of {', '.join(CRITERIA[1:])}. Received {criterion!r}."
            )
        self.criterion, self.stage = criterion, stage
        self.path = Path(workdir) / workdir_lib.best_epoch_file(stage)
        self.epoch, self.score = -1, -math.inf
        self.trainable: list[np.ndarray] | None = None
        self.non_trainable: list[np.ndarray] | None = None

    def score_of(self, accuracies: Mapping[str, float]) -> float:
        """The criterion's number among an evaluation's accuracies (`val` or `test_base`)."""
        return float(accuracies[self.criterion])

    def update(self, epoch: int, score: float, trainable, non_trainable) -> bool:
        """Keeps these variables if `score` beats the best so far (ties keep the earlier epoch);
        returns whether it did. `trainable` / `non_trainable` are lists of arrays."""
        if not score > self.score:
            return False
        self.epoch, self.score = int(epoch), float(score)
        self.trainable = [np.asarray(v) for v in trainable]
        self.non_trainable = [np.asarray(v) for v in non_trainable]
        arrays = {f"trainable_{i}": v for i, v in enumerate(self.trainable)}
        arrays.update({f"non_trainable_{i}": v for i, v in enumerate(self.non_trainable)})

        def write():
            with atomic.replacing(self.path, suffix=".npz") as tmp:
                np.savez(tmp, epoch=self.epoch, score=self.score, **arrays)

        distributed.on_primary(write, what=f"writing {self.path}")
        return True

    def restore(self) -> bool:
        """Reads the best epoch saved by an interrupted run of this stage, if any."""
        if not self.path.is_file():
            return False
        with np.load(self.path, allow_pickle=False) as archive:
            files = archive.files
            for kind in ("trainable", "non_trainable"):
                count = sum(name.startswith(f"{kind}_") for name in files)
                setattr(self, kind, [archive[f"{kind}_{i}"] for i in range(count)])
            self.epoch, self.score = int(archive["epoch"]), float(archive["score"])
        return True

    def discard(self) -> None:
        """Removes a best-epoch file left by an earlier run (a fresh stage starts over)."""
        distributed.on_primary(
            lambda: self.path.unlink(missing_ok=True), what=f"removing {self.path}"
        )

    def summary(self) -> dict:
        return {"criterion": self.criterion, "epoch": self.epoch, "score": self.score}
