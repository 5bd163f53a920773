"""The package's layers hold: every import inside gatewayd points down (or sideways within a layer), and no
adapter imports another adapter. A planted upward import fails this test (see test_a_planted_upward_import_fails).

    core <- auth <- base (errors, config, scheduling, tasks, netlink) <- ports <- adapters <- runtime
         <- api (with the generated gatewayd.v1) <- daemon <- cli, ctl, lab
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gatewayd

ROOT = Path(gatewayd.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("gatewayd.core",),
    ("gatewayd.auth",),
    ("gatewayd", "gatewayd.errors", "gatewayd.config", "gatewayd.scheduling", "gatewayd.tasks", "gatewayd.netlink"),
    ("gatewayd.ports",),
    ("gatewayd.adapters",),
    ("gatewayd.runtime",),
    ("gatewayd.api", "gatewayd.v1"),
    ("gatewayd.daemon",),
    ("gatewayd.cli", "gatewayd.ctl", "gatewayd.lab", "gatewayd.__main__"),
]


def layer_of(module: str) -> int:
    """The layer of a gatewayd module: the longest matching prefix decides."""
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def adapter_of(module: str) -> str | None:
    """gatewayd.adapters.X[.…] -> X: each module or subpackage under adapters is one adapter."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["gatewayd", "adapters"] else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """gatewayd modules imported by a file (absolute imports; `from gatewayd.x import y` counts as x.y if y is a
    module, else x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "gatewayd"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gatewayd":
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (ROOT.parent / Path(*sub.split("."))).is_dir()
                found.append(sub if is_module else node.module)
    return found


def violations(files: dict[str, list[str]]) -> list[str]:
    out = []
    for module, targets in files.items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                out.append(f"{module} imports {target}, a higher layer")
            mine, theirs = adapter_of(module), adapter_of(target)
            if mine and theirs and mine != theirs:
                out.append(f"adapter {module} imports another adapter, {target}")
    return out


def package_imports() -> dict[str, list[str]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py") if "v1" not in p.relative_to(ROOT).parts}


def test_every_import_points_down() -> None:
    assert violations(package_imports()) == []


def test_the_runtime_reaches_adapters_only_through_ports() -> None:
    reach = [f"{m} imports {t}" for m, ts in package_imports().items() if layer_of(m) == layer_of("gatewayd.runtime")
             for t in ts if adapter_of(t)]
    assert reach == []


@pytest.mark.parametrize(("module", "target"), [
    ("gatewayd.runtime.driver", "gatewayd.api.services"),
    ("gatewayd.core.state", "gatewayd.ports"),
    ("gatewayd.adapters.mqtt", "gatewayd.adapters.sqlite.outbox"),
    ("gatewayd.api.convert", "gatewayd.daemon"),
])
def test_a_planted_upward_import_fails(module: str, target: str) -> None:
    files = package_imports()
    assert violations(files) == []
    files[module] = [*files[module], target]
    assert violations(files), f"{module} -> {target} went unnoticed"
