"""The package's layers (documentation/extending.md, Layout): each module imports only from its own layer or the
layers before it; every module imports; no lab facts in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import nnunet_semi

LAYERS = ["errors", "components", "data", "trainer", "methods", "tools", "cli"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nnunet_semi" else None


def test_modules_import_only_from_earlier_layers():
    root = Path(nnunet_semi.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        own = path.relative_to(root).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                target = _layer(name)
                if target is not None and LAYERS.index(target) > LAYERS.index(own):
                    wrong.append(f"{path.relative_to(root)} imports {name}")
    assert not wrong, wrong


def test_every_library_module_is_in_a_layer():
    root = Path(nnunet_semi.__file__).parent
    top = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert top - {"__init__", "ext_trainers"} == set(LAYERS)  # ext_trainers: trainers/ in a wheel


def test_every_command_is_an_entry_of_cli_with_its_one_error_style():
    import tomllib

    import nnunet_semi.cli

    pyproject = Path(nnunet_semi.__file__).parents[1] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    for command, target in scripts.items():
        module, function = target.split(":")
        assert module == "nnunet_semi.cli", command
        entry = getattr(nnunet_semi.cli, function)
        assert entry.__wrapped__ is not None, command  # the one error style
        assert command == f"nnUNetv2_semi_{function.removesuffix('_entry')}"  # what its error line names


def test_every_module_of_the_package_imports():
    """A module that imports a removed module fails here, not in the one command that reaches it."""
    import importlib
    import pkgutil

    failed = {}
    for module in pkgutil.walk_packages(nnunet_semi.__path__, "nnunet_semi."):
        try:
            importlib.import_module(module.name)
        except Exception as error:  # noqa: BLE001 (every failure is the finding)
            failed[module.name] = f"{type(error).__name__}: {error}"
    assert not failed, failed


def test_the_package_holds_no_lab_facts():
    """The library names no dataset of ours, no GPU model and no time budget of our machines: those live in the lab
    (benchmarks/)."""
    import re

    root = Path(nnunet_semi.__file__).parent
    facts = re.compile(r"Dataset101_LA|LA_0\d\d|\bH100\b|\bH200\b|GPU_DEADLINE|9-minute|gpu\.md")
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if facts.search(line)]
    assert not found, found
