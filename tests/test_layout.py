"""The package's shape: one top-level package; the network (``dups.models``) imports nothing
else of the project; no modules import each other in a circle, counting imports inside
functions too (an import moved into a function hides a circle, it does not remove it); every
command-line option says its default."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dups"


def _module(path: Path) -> str:
    parts = ["dups", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its file)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_models_import_nothing_else_of_the_project():
    graph = _imports()
    outside = {m: sorted(t for t in deps if not t.startswith("dups.models"))
               for m, deps in graph.items() if m.startswith("dups.models")}
    assert {m: t for m, t in outside.items() if t} == {}


def test_no_import_circles():
    graph = _imports()
    # a package's __init__ re-exporting its own modules is not a circle of the project's layers
    graph = {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_every_option_has_help_with_its_default():
    from dups.cli import build_parser

    _, commands = build_parser()
    missing, no_default = [], []
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._option_string_actions.values():
            if action.dest == "help":
                continue
            if not action.help:
                missing.append(f"{name} {action.option_strings[0]}")
            elif action.default not in (None, False) and "default" not in text.split(action.option_strings[-1], 1)[1]:
                no_default.append(f"{name} {action.option_strings[0]}")
    assert missing == [] and no_default == []


@pytest.mark.integration
def test_the_wheel_installs_one_package_with_its_configs(tmp_path):
    """No top-level ``model`` / ``pipeline`` beside a user's own modules; the shipped configs in."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT.parent), "-w", str(tmp_path)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("dups-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"dups", wheel.name.split("-py")[0] + ".dist-info"}
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and shipped <= {n.removeprefix("dups/") for n in names}
