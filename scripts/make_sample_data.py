"""Regenerate sample_data/heart deterministically (8 training + 2 test phantoms)."""

import argparse
import shutil
from pathlib import Path

from medseg.data.phantom import make_dataset

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "sample_data" / "heart")
    )
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    folder = make_dataset(args.output)
    print(f"wrote {folder}")
