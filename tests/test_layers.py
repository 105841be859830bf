"""Imports point one way: no core module reaches up into the manager, the API or the CLI, and no
runtime plugin reaches into the server beyond the plugin contract."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("mmserver.api", "mmserver.cli", "mmserver.manager", "mmserver.watcher", "mmserver.__main__")
ORCHESTRATION = {"manager.py", "watcher.py", "cli.py", "__main__.py"}


def imported_modules(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def test_core_modules_do_not_import_the_layers_above_them():
    for path in sorted((ROOT / "mmserver").glob("*.py")):
        if path.name in ORCHESTRATION:
            continue
        upward = {m for m in imported_modules(path, "mmserver") if m.startswith(UPPER)}
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_runtime_plugins_use_only_the_plugin_contract():
    for path in sorted((ROOT / "runtimes").glob("*/mmserver_*/*.py")):
        package = path.parent.name
        reached = {m for m in imported_modules(path, package) if m.startswith(UPPER)}
        assert not reached, f"{path.relative_to(ROOT)} imports {sorted(reached)}"
