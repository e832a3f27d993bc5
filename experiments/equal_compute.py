"""Training steps that give each recipe the same compute: FLOPs of one real training step
(forward + backward, counted by `torch.utils.flop_counter` on a batch from the data) at each
recipe's tiny config, and the steps that spend the budget of a reference recipe.

    python experiments/equal_compute.py --data data/shapes --budget blip:300 clip coca blip

prints one `recipe steps gflop_per_step` line per recipe (the reference included), for the
experiment scripts to read. The optimizer step and data loading are not counted (they are not
model FLOPs); steps are rounded to the nearest 10.
"""

from __future__ import annotations

import argparse
import tempfile

from torch.utils.flop_counter import FlopCounterMode

from vlp.config import load_run_config, recipe_config_path
from vlp.train.trainer import Trainer


def step_flops(recipe: str, data: str, overrides: list[str]) -> int:
    """FLOPs of the first training step of `recipe` (tiny config and `overrides`) on `data`."""
    cfg = load_run_config(
        recipe,
        recipe_config_path(recipe, "tiny"),
        [f"data.path={data}", "data.workers=0", "train.ckpt_every=1000000", *overrides],
    )
    with tempfile.TemporaryDirectory() as run, FlopCounterMode(display=False) as counter:
        Trainer(cfg, run, progress=False).fit(stop_at=1)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--budget", required=True, help="RECIPE:STEPS whose compute every recipe gets")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every recipe (e.g. model.image_tokenizer=PATH)",
    )
    args = parser.parse_args()
    reference, steps = args.budget.split(":")
    flops = {recipe: step_flops(recipe, args.data, args.set) for recipe in dict.fromkeys([reference, *args.recipes])}
    budget = flops[reference] * int(steps)
    for recipe in args.recipes:
        print(recipe, max(10, round(budget / flops[recipe] / 10) * 10), round(flops[recipe] / 1e9, 1))


if __name__ == "__main__":
    main()
