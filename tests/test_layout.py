"""The method package stands alone: ddpo/ imports nothing of the stages' shell (utils/, config, tools/)."""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {"torch", "diffusers", "peft", "numpy", "tqdm", "ddpo"}  # tqdm: the sampling loop's optional bar


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module.split(".")[0]


def test_the_method_imports_only_torch_diffusers_peft_numpy_and_itself():
    modules = sorted((REPO / "ddpo").glob("*.py"))
    assert len(modules) >= 10
    outside = {(path.name, package) for path in modules for package in imported_packages(path)
               if package not in ALLOWED and package not in sys.stdlib_module_names}
    assert not outside, f"ddpo/ must not import the shell or other packages: {sorted(outside)}"
