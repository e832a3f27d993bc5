"""docs/design.md's worked example of adding a recipe works as written: its recipe file and its
config, taken from the page, train on a small shapes world, evaluate and load back."""

import importlib.util
import re
import sys
from pathlib import Path

import yaml

import vlp
from vlp.config import load_run_config
from vlp.eval.run import evaluate
from vlp.train.trainer import Trainer

DESIGN = Path(__file__).parent.parent / "docs" / "design.md"


def example_blocks() -> tuple[str, str]:
    """The python and yaml blocks of the page's "Adding a recipe" section."""
    section = DESIGN.read_text().split("## Adding a recipe", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return python, config


def import_recipe(source: str, folder: Path) -> None:
    """Import the example as a module (which registers the recipe), once per process."""
    if "design_example_recipe" in sys.modules:
        return
    path = folder / "design_example_recipe.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("design_example_recipe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def test_the_worked_example_trains_evaluates_and_loads(tmp_path, shapes_dir):
    python, config = example_blocks()
    import_recipe(python, tmp_path)
    assert "align" in vlp.models.recipes()
    data = yaml.safe_load(config)
    data["model"]["vision"]["image_size"] = 32  # the test world's images
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_run_config(
        "align",
        path,
        [f"data.path={shapes_dir}", "train.steps=6", "train.log_every=1", "data.batch_size=16", "data.workers=0"],
    )
    Trainer(cfg, tmp_path / "run", progress=False).fit()

    model = vlp.load(tmp_path / "run")
    assert model.recipe == "align" and model.tokenizer_style == "bert"
    assert model.text.cfg.causal is False and model.text.cfg.pool == "cls"
    results = evaluate(model, shapes_dir, tmp_path / "run", tasks=["retrieval"])
    assert 0 <= results["retrieval"]["i2t_R@1"] <= 100
