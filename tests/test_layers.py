"""The package's architecture, checked on its import graph: three programs around one
sans-IO core, dependencies pointing one way, no cycles (STYLE.md).

core <- policy <- broker; core <- client <- jobs <- gateway (the gateway also reads
the policy, to show its named commands); testing -> core, client. The broker and the
client side never import each other: they meet only on the wire.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "sockexec_py"

#: Which layers each layer may import (itself included).
ALLOWED = {
    "core": {"core"},
    "policy": {"core", "policy"},
    "broker": {"core", "policy", "broker"},
    "client": {"core", "client"},
    "jobs": {"core", "client", "jobs"},
    "gateway": {"core", "client", "jobs", "policy", "gateway"},
    "testing": {"core", "client", "testing"},
    "entry": {"core", "broker"},  # sockexec_py/__main__.py: `python -m sockexec_py`
}
SUBPACKAGES = ("policy", "broker", "client", "jobs", "gateway", "testing")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "sockexec_py.__main__":
        return "entry"
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "core"


def imports_of(path: Path) -> set[str]:
    """Every sockexec_py module ``path`` imports, anywhere in it (functions and
    ``TYPE_CHECKING`` blocks included: a cycle there is still a cycle in the design)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.add(candidate if _is_module(candidate) else origin)
    return {name for name in found if name.split(".")[0] == "sockexec_py"}


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_the_allowed_way() -> None:
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert wrong == []


def test_only_the_cli_imports_the_broker_server() -> None:
    importers = {m for m, targets in graph().items() if "sockexec_py.broker.server" in targets}
    assert importers == {"sockexec_py.broker.cli"}


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = [sorted(c) for c in _strongly_connected(edges) if len(c) > 1]
    cycles += [[m] for m, targets in edges.items() if m in targets]
    assert cycles == []


def test_the_checker_sees_a_cycle_and_a_wrong_direction() -> None:
    """The checks above must be able to fail: a cycle and a broker -> client edge."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert [sorted(c) for c in _strongly_connected(edges) if len(c) > 1] == [["a", "b", "c"]]
    assert layer("sockexec_py.client._trio") not in ALLOWED[layer("sockexec_py.broker.server")]
    assert layer("sockexec_py.broker") not in ALLOWED["client"]


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


@pytest.mark.parametrize(
    "package",
    ["sockexec_py", *(f"sockexec_py.{p}" for p in SUBPACKAGES if (PACKAGE / p).is_dir())],
)
def test_each_subpackage_imports_alone(package: str) -> None:
    """``python -c 'import sockexec_py.X'`` works, and loads nothing of the layers X may
    not depend on."""
    code = (
        f"import {package}, sys; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('sockexec_py')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    own = "core" if package == "sockexec_py" else package.split(".")[1]
    loaded = {layer(m) for m in proc.stdout.split()}
    assert loaded <= ALLOWED[own], (package, sorted(loaded))


def test_the_gateway_without_its_extras_says_what_to_install() -> None:
    """Installed without ``[gateway]``: one line naming the missing package and the
    command, not a traceback."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from sockexec_py.gateway.cli import main; "
        "sys.exit(main(['--socket', '/nonexistent.sock']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 111, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "prometheus_client" in proc.stderr
    assert "pip install 'sockexec_py[gateway]'" in proc.stderr
