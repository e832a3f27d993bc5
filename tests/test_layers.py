"""Layers point one way (docs/design.md): a module imports only from its own layer and the
layers below it. Checked on the source, imports inside functions included; imports that only
serve type hints (under `if TYPE_CHECKING:`) are left out."""

import ast
from pathlib import Path

import vlp

SRC = Path(vlp.__file__).parent

# Lowest first. A module of a layer may import from any earlier layer and from its own.
LAYERS = [
    ("base", ["vlp.config", "vlp.distributed", "vlp.prompts"]),
    ("data", ["vlp.data"]),
    ("nn", ["vlp.nn", "vlp.generate"]),
    ("losses", ["vlp.losses"]),
    ("models", ["vlp.models"]),
    ("interop", ["vlp.interop"]),
    # vlp.api (vlp.load, vlp.save, ...) is the Python face of this layer; applications use it.
    ("train / eval / apps", ["vlp.train", "vlp.eval", "vlp.apps", "vlp.api", "vlp"]),
    ("cli", ["vlp.cli"]),
]
# data sits beside nn, losses and models rather than under them: the models get text and images
# as tensors and never import the data package (the layers that join the two do).
APART = {("nn", "data"), ("losses", "data"), ("models", "data")}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix."""
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, module
    return index


def module_name(path: Path) -> str:
    parts = ["vlp", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every vlp import outside `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlp":
            names = [f"{node.module}.{a.name}" if node.module == "vlp" else node.module for a in node.names]
            found.extend((node.lineno, name) for name in names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vlp")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        own = module_name(path)
        mine = layer_of(own)
        for line, target in imports(ast.parse(path.read_text())):
            theirs = layer_of(target)
            pair = (LAYERS[mine][0], LAYERS[theirs][0])
            if theirs > mine or pair in APART:
                found.append(f"{path.relative_to(SRC.parent)}:{line}: {own} ({pair[0]}) imports {target} ({pair[1]})")
    return found


def test_layers_point_one_way():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from vlp.train.trainer import Trainer\n")
    assert imports(tree) == [(2, "vlp.train.trainer")]
    assert layer_of("vlp.train.trainer") > layer_of("vlp.models.clip")
