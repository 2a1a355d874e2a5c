"""The package's structure: imports run one way (no cycle, deferred imports included), the application
sits on top of the library, every adaptive model shares the one base class, the public names import.

The import graph is read from the source with ``ast`` (nothing is imported to build it): every
``import adaexit...`` / ``from adaexit... import`` / relative import in every module of the ``adaexit``
package, at module level or deferred inside a function, becomes an edge to the module it names. A
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` itself; importing
a submodule of another package also runs that package's ``__init__``, so that is an edge too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each package's source lives (pyproject's [tool.setuptools.package-dir]): adaexit.kernels is kernels/.
PACKAGE_DIRS = {"adaexit": ROOT / "adaexit", "adaexit.kernels": ROOT / "kernels"}
APPS = "adaexit.apps"
# Entry points sit on top of everything: the CLI's ``demo`` command is the application's main job.
ENTRY_POINTS = {"adaexit.__main__"}
ADAPTIVE_MODELS = [
    ("adaexit.early_exit", "EarlyExitNet"),
    ("adaexit.cascade", "Cascade"),
    ("adaexit.anytime", "EANN"),
    ("adaexit.routing", "D2NN"),
]


# ---------------------------------------------------------------------------------------------
# The import graph, from the source
# ---------------------------------------------------------------------------------------------
def package_modules(package_dirs=None) -> dict[str, tuple[Path, bool]]:
    """``module name -> (file, is_package)`` for every ``.py`` file of the package."""
    package_dirs = PACKAGE_DIRS if package_dirs is None else package_dirs
    modules = {}
    for package, directory in sorted(package_dirs.items()):  # a nested package-dir mapping read last, wins
        for path in sorted(directory.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(directory).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules[name] = (path, is_package)
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _known(name: str, modules) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules) -> list[tuple[str, int]]:
    """``(target module, line)`` for every import of a package module in ``module``'s source."""
    path, is_package = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module if is_package else module.rpartition(".")[0]
    named: list[tuple[str, int]] = []
    for node in ast.walk(tree):  # every statement, inside functions and classes too
        if isinstance(node, ast.Import):
            named += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                named.append((submodule if alias.name != "*" and submodule in modules else base, node.lineno))
    targets = []
    for name, line in named:
        target = _known(name, modules)
        if target is None:
            continue  # not a module of this package (torch, triton, the standard library, ...)
        # Importing pkg.sub runs pkg/__init__ first, unless pkg is this module or one of its own packages
        # (already being imported when this module runs).
        mine = set(_ancestors(module)) | {module}
        targets += [(a, line) for a in _ancestors(target) if a in modules and a not in mine]
        if target != module:
            targets.append((target, line))
    return targets


def import_graph(modules=None, under: Path | None = None) -> dict[str, dict[str, int]]:
    """``module -> {imported module: first line}`` for every module of the package. With ``under``, only
    the modules whose file is below that folder are read; the others are nodes without edges."""
    modules = package_modules() if modules is None else modules
    graph = {}
    for module, (path, _) in modules.items():
        edges: dict[str, int] = {}
        if under is None or path.is_relative_to(under):
            for target, line in imports_of(module, modules):
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it is acyclic (iterative DFS)."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif state.get(nxt, 2) == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def describe_cycle(cycle, graph, modules) -> str:
    """One line per edge of ``cycle``: the two modules and the file and line of the import."""
    steps = [f"  {a} -> {b}  ({_where(modules[a][0])}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle:\n" + "\n".join(steps)


def test_package_dirs_match_pyproject():
    """The graph reads where setuptools installs from, and every package it finds is installed."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = {package: ROOT / folder for package, folder in config["package-dir"].items()}
    for package, folder in PACKAGE_DIRS.items():
        assert declared.get(package) == folder, package
    found = {name for name, (_, is_package) in package_modules().items() if is_package}
    assert found == set(config["packages"]), "pyproject's [tool.setuptools] packages must list every package"


@pytest.fixture(scope="module")
def modules():
    return package_modules()


@pytest.fixture(scope="module")
def graph(modules):
    return import_graph(modules)


# ---------------------------------------------------------------------------------------------
# (a) imports run one way
# ---------------------------------------------------------------------------------------------
def test_the_graph_covers_the_package(modules, graph):
    """A sanity check of the reader: the modules and some edges it must see."""
    for name in ("adaexit", "adaexit.base", "adaexit.executor", "adaexit.kernels", "adaexit.kernels._dispatch",
                 "adaexit.calibration", "adaexit.policies", "adaexit.apps.fashion_mnist.demo"):
        assert name in modules, name
    assert "adaexit.base" in graph["adaexit.early_exit"]  # from .base import AdaptiveModel
    assert "adaexit.kernels._dispatch" in graph["adaexit.executor"]  # from .kernels._dispatch import to_host
    assert "adaexit.kernels" in graph["adaexit.executor"]  # ... and the package it lives in


def test_import_graph_has_no_cycle(modules, graph):
    """The whole installed package, adaexit.kernels (kernels/) included; deferred imports count."""
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph, modules)


def test_the_application_sits_on_top_of_the_library(modules, graph):
    """Only the application itself and the CLI import ``adaexit.apps``."""
    wrong = []
    for module, edges in graph.items():
        for target, line in edges.items():
            where = f"{_where(modules[module][0])}:{line}"
            in_app = module == APPS or module.startswith(APPS + ".")
            if (target == APPS or target.startswith(APPS + ".")) and not (
                in_app or module in ENTRY_POINTS
            ):
                wrong.append(f"{where}: {module} imports the application ({target})")
    assert not wrong, "\n".join(wrong)


# The checker itself: it must find what it is there to find.
def _write(root: Path, files: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules({"adaexit": root / "adaexit", "adaexit.kernels": root / "kernels"})


CLEAN = {
    "adaexit/__init__.py": "from .early_exit import Net\nfrom . import calibration\n",
    "adaexit/base.py": "import torch\nfrom .kernels import gate\n",
    "adaexit/early_exit.py": "from .base import *\nfrom adaexit.kernels import _dispatch\n",
    "adaexit/calibration/__init__.py": "from .calibrate import calibrate\n",
    "adaexit/calibration/calibrate.py": "from ..early_exit import Net\nfrom . import thresholds\n",
    "adaexit/calibration/thresholds.py": "import adaexit.kernels._dispatch\n",
    "adaexit/policies/__init__.py": "from .learned import LearnedPolicy\n",
    "adaexit/policies/learned.py": "def fit():\n    from ..base import x\n",
    "kernels/__init__.py": "from .ops.gate import gate\nfrom . import _dispatch\n",
    "kernels/_dispatch.py": "import os\n",
    "kernels/ops/__init__.py": "",
    "kernels/ops/gate.py": "from .._dispatch import use_triton\n",
}


@pytest.mark.parametrize(
    "change, cycle",
    [
        (  # the calibration <-> policies cycle the restructure broke: a deferred import closes it
            {"adaexit/policies/learned.py": "def fit():\n    from ..calibration.thresholds import fit_gates\n",
             "adaexit/calibration/thresholds.py": "from ..policies import LearnedPolicy\n"},
            {"adaexit.policies", "adaexit.policies.learned", "adaexit.calibration.thresholds"},
        ),
        (  # importing a submodule runs its package's __init__, which imports back
            {"adaexit/base.py": "from adaexit.calibration import thresholds\n"},
            {"adaexit.base", "adaexit.calibration", "adaexit.calibration.calibrate", "adaexit.early_exit"},
        ),
        (  # a library module importing the top-level package, which imports everything
            {"adaexit/base.py": "from . import Net\n"},
            {"adaexit", "adaexit.base", "adaexit.early_exit"},
        ),
        (  # through the kernels, mapped to another folder
            {"kernels/_dispatch.py": "import adaexit.early_exit\n"},
            {"adaexit.early_exit", "adaexit.kernels._dispatch"},
        ),
    ],
    ids=["deferred", "package-init", "top-level", "kernels"],
)
def test_the_checker_finds_cycles(tmp_path, change, cycle):
    modules = _write(tmp_path, CLEAN)
    assert find_cycle(import_graph(modules)) is None  # the clean tree has none
    modules = _write(tmp_path, change)
    graph = import_graph(modules)
    found = find_cycle(graph)
    assert found is not None and found[0] == found[-1]
    assert cycle <= set(found), found
    message = describe_cycle(found, graph, modules)
    assert message.count(" -> ") == len(found) - 1 and ".py:" in message


def test_the_checker_resolves_names(tmp_path):
    modules = _write(tmp_path, CLEAN)
    graph = import_graph(modules)
    assert set(graph["adaexit.calibration.calibrate"]) == {"adaexit.early_exit", "adaexit.calibration.thresholds"}
    # import adaexit.kernels._dispatch: the module and the package it lives in
    assert set(graph["adaexit.calibration.thresholds"]) == {"adaexit.kernels", "adaexit.kernels._dispatch"}
    assert set(graph["adaexit.policies.learned"]) == {"adaexit.base"}  # deferred, inside a function
    assert set(graph["adaexit.early_exit"]) == {"adaexit.base", "adaexit.kernels", "adaexit.kernels._dispatch"}
    assert set(graph["adaexit.base"]) == {"adaexit.kernels"}  # a name of the kernels package
    assert set(graph["adaexit.kernels"]) == {"adaexit.kernels.ops", "adaexit.kernels.ops.gate",
                                             "adaexit.kernels._dispatch"}
    assert set(graph["adaexit.kernels.ops.gate"]) == {"adaexit.kernels._dispatch"}
    assert set(graph["adaexit"]) == {"adaexit.early_exit", "adaexit.calibration"}


# ---------------------------------------------------------------------------------------------
# (b) one base class, (c) the public names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, name", ADAPTIVE_MODELS, ids=[name for _, name in ADAPTIVE_MODELS])
def test_every_adaptive_model_derives_from_the_one_base(module, name):
    import importlib

    import adaexit

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, adaexit.AdaptiveModel), f"{module}.{name} does not derive from adaexit.AdaptiveModel"
    assert cls is not adaexit.AdaptiveModel
    assert getattr(adaexit, name) is cls  # the public name is the same class


def test_public_names_import():
    import adaexit

    assert len(adaexit.__all__) == len(set(adaexit.__all__)), "adaexit.__all__ names a name twice"
    missing = [name for name in adaexit.__all__ if not hasattr(adaexit, name)]
    assert not missing, f"adaexit.__all__ names what adaexit does not define: {missing}"
    namespace: dict = {}
    exec("from adaexit import *", namespace)
    assert set(adaexit.__all__) <= set(namespace)


def test_every_module_imports_first(modules):
    """Each module imported first, in a fresh set of adaexit modules: an import-order cycle would fail."""
    names = sorted(modules)
    script = (
        "import importlib, sys\n"
        "import torch\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'adaexit' or m.startswith('adaexit.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'{name}: {type(err).__name__}: {err}')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "", "modules that fail when imported first:\n" + result.stdout


# ---------------------------------------------------------------------------------------------
# kernels/ is adaexit.kernels, never a top-level ``kernels`` (Hugging Face's package of that name, which
# transformers >= 5.25 imports, must win even when the repository root is on sys.path)
# ---------------------------------------------------------------------------------------------
def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_never_shadows_a_top_level_kernels_package():
    probe = _run_from_root(
        "import sys, adaexit.kernels\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
        "else:\n    print(kernels.__file__)\n"
        "print(adaexit.kernels.__file__)\n"
    )
    assert probe.returncode == 0, probe.stderr
    top, ours = probe.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert top == "absent" or not Path(top).resolve().is_relative_to(ROOT / "kernels"), top


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers", reason="transformers (adaexit[hf]) is not installed")
    probe = _run_from_root("from transformers import BertForSequenceClassification; import adaexit")
    assert probe.returncode == 0, probe.stderr
