"""The recipe protocol (docs/design.md): every registered recipe is a `Recipe`, gets its tokenizer
and run config when built, and nothing outside vlp.models probes a model for capabilities."""

import ast
from pathlib import Path

import pytest

import vlp
from vlp.config import load_run_config
from vlp.data.tokenizer import Tokenizer
from vlp.models.recipe import Recipe
from vlp.models.registry import build_model, recipe_classes, recipes


@pytest.mark.parametrize("name", recipes())
def test_every_recipe_is_a_recipe(name):
    model_cls, _ = recipe_classes(name)
    assert issubclass(model_cls, Recipe) and model_cls.recipe == name
    assert model_cls.tokenizer_style in ("bert", "clip")


def test_a_model_is_built_with_its_tokenizer_and_run_config(tiny_config, shapes_dir):
    cfg, tokenizer = load_run_config("clip", tiny_config), Tokenizer.load(shapes_dir / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    assert model.tokenizer is tokenizer and model.run_config is cfg
    assert model.text_config().vocab_size == tokenizer.vocab_size and model.image_size() == 32
    assert not model.can_caption and not model.has_itm()
    with pytest.raises(TypeError, match="no text decoder"):
        model.caption(None)


def capability_probes(tree: ast.AST) -> list[int]:
    """Lines calling hasattr/getattr on something named like a model."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", "") in ("hasattr", "getattr")
        and node.args
        and "model" in ast.unparse(node.args[0])
    ]


def test_nothing_outside_the_models_probes_a_model():
    src = Path(vlp.__file__).parent
    found = [
        f"{path.relative_to(src)}:{line}"
        for path in sorted(src.rglob("*.py"))
        if path.parent.name != "models" and path.name != "checkpoint.py"  # any module's weights
        for line in capability_probes(ast.parse(path.read_text()))
    ]
    assert found == []
    assert capability_probes(ast.parse("hasattr(model, 'generate')")) == [1]
