"""A research script on top of medseg: swap the loss, add a callback, train, read the results.

python scripts/research_example.py [--data sample_data/heart] [--max-time 60] [--output runs/research]
"""

import argparse
from pathlib import Path

from monai.losses import DiceFocalLoss

import medseg


class DiceLog(medseg.Callback):
    """Keeps the validation Dice of every validation and says when it improves."""

    def __init__(self):
        self.history = []

    def on_validation_end(self, trainer, metrics):
        best = max(self.history, default=0.0)
        self.history.append(metrics["dice_mean"])
        if metrics["dice_mean"] > best:
            print(f"epoch {trainer.epoch}: validation Dice up to {metrics['dice_mean']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "sample_data" / "heart"))
    parser.add_argument("--output", default="runs/research")
    parser.add_argument("--max-time", type=float, default=60.0)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()

    config = medseg.load_config(None, [f"train.max_time={args.max_time}", *args.set])
    config.data.root, config.train.output_dir = args.data, args.output
    log = DiceLog()
    trainer = medseg.Trainer(
        config,
        overwrite=True,
        callbacks=[log],
        loss_fn=DiceFocalLoss(to_onehot_y=True, softmax=True),  # the swapped loss
    )
    summary = trainer.fit()
    print(
        f"{len(log.history)} validations, best Dice {summary['best_dice']:.3f}; checkpoint {summary['best']}"
    )


if __name__ == "__main__":
    main()
