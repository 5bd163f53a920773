"""The core imports nothing outside the standard library and the core itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gatewayd.core

CORE = Path(gatewayd.core.__file__).parent


def test_core_imports_only_the_standard_library() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                ok = top in sys.stdlib_module_names or name.startswith("gatewayd.core") or top == "__future__"
                assert ok, f"{path.name} imports {name}"
