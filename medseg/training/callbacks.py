"""Callbacks: objects whose hooks the Trainer calls. TensorBoard logging is one."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.training.trainer import Trainer

__all__ = ["Callback", "TensorBoardLogger", "tensorboard_available"]


class Callback:
    """Base for callbacks: override the hooks you need; each receives the trainer first.

    Under torchrun every rank calls the hooks; ``trainer.dist.is_main`` tells rank 0.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...

    def on_train_end(self, trainer: Trainer, summary: dict) -> None: ...


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger(Callback):
    """Writes each epoch's loss, learning rate, data-wait share and Dice as TensorBoard scalars.

    Args:
        log_dir: the event folder (the trainer uses ``<output_dir>/tensorboard``).
    """

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, float) and not math.isnan(value):
                group = "validation" if key.startswith("dice") else "train"
                self.writer.add_scalar(f"{group}/{key}", value, row["step"])
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, summary: dict) -> None:
        self.writer.close()
