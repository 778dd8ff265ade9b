"""Shared test setup: one ROS domain per test run, one compute thread per process, and the
``ros`` marker on every test that needs rclpy (the markers are registered in pyproject.toml).

A test needs ROS when its module imports a ROS package while it is imported (directly, through
``pytest.importorskip``, or through a test helper or a ``scpo_ros`` module that does), or when
the test itself, a fixture it uses, or a function of its module that it calls does. That is
read from the source (imports are not run), so ``pytest -m "not ros"`` selects the same tests
whether rclpy is installed or not. A module that needs a ROS package which cannot be imported
here is not imported at all: it collects as one ``ros`` test that skips (deselected by
``-m "not ros"``, not a collection error); a ``ros`` test of a ROS-free module skips likewise.
The marker follows the imports, not the file's name: renaming a test file changes nothing here.

Where a test goes (the tests mirror the modules):

- ``test_<module>.py`` for each ROS-free module ``scpo_ros/<module>.py``;
  ``test_safeguard_<module>.py``, ``test_experiments_<module>.py`` and ``test_ros_<module>.py``
  for ``scpo_ros/safeguard/``, ``scpo_ros/experiments/`` and ``scpo_ros/ros/``;
- ``test_node_<node>.py`` for each node of ``scpo_ros/nodes/`` (over real DDS);
- ``test_system_<what>.py`` for graphs of several nodes (launch, demo, compare, learning graphs);
- ``test_attacks_<node>.py``: the attack tests of issue 9, grouped by fault class per node;
- ``test_ros_free.py``: the ROS-free selection itself (``-m "not ros"`` with rclpy blocked).

Helpers shared by several test files are modules without the ``test_`` prefix:
``ros_graph_helpers.py`` (node processes, the probe node), ``attack_helpers.py`` (the attack
tests' probe, graphs and checks), ``late_set_helpers.py`` (the late-command sets and plants).
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
from pathlib import Path

import pytest

# Every process of this run (nodes started by tests included) shares one domain id
# that no other run on the machine uses at the same time.
os.environ.setdefault("ROS_DOMAIN_ID", str(int(os.environ.get("SCPO_TEST_DOMAIN_ID", 1 + os.getpid() % 100))))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
# Tests start node processes beside pytest on a 2-core machine: OpenMP/BLAS thread pools
# that spin while another process holds the other core slow everything down by 10x+.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TEST_DIR = Path(__file__).resolve().parent
REPO = TEST_DIR.parent
# Where local modules are looked up (test helpers, then the package): like sys.path in a test run.
LOCAL_ROOTS = (TEST_DIR, REPO)

# Top-level packages that come with ROS 2 (a distro, or the `ros` extra's wheels), by name.
# test_ros_free.py blocks exactly these. rosbags is not one: it is pure Python and a dependency.
ROS_NAMES = frozenset({
    "rclpy", "rcl", "rmw", "rcutils", "rcpputils", "rpyutils", "tracetools", "ament_index_python",
    "launch", "launch_ros", "launch_testing", "launch_testing_ros", "message_filters", "tf2_ros",
    "ros2cli", "ros2launch", "ros_wheels_bootstrapper",
})
ROS_PREFIXES = ("rcl_", "rmw_", "rosidl_", "launch_", "ros2")
ROS_SUFFIXES = ("_msgs", "_srvs", "_interfaces")


def is_ros_package(top_level: str) -> bool:
    """Whether a top-level package name is one of ROS 2's."""
    return top_level in ROS_NAMES or top_level.startswith(ROS_PREFIXES) or top_level.endswith(ROS_SUFFIXES)


# ------------------------------------------------------------------ reading imports from source

def _local_file(module: str) -> Path | None:
    parts = module.split(".")
    for root in LOCAL_ROOTS:
        for path in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if path.is_file():
                return path
    return None


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    package = path.parent
    for _ in range(node.level - 1):
        package = package.parent
    for root in LOCAL_ROOTS:
        if package == root or root in package.parents:
            base = ".".join(package.relative_to(root).parts)
            return ".".join(p for p in (base, node.module) if p)
    return node.module or ""


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _imported_names(node: ast.AST, path: Path) -> list[str]:
    """The modules one statement or call imports (``from m import x`` also tries ``m.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(node, path)
        return [base] + [f"{base}.{alias.name}" for alias in node.names if base]
    if isinstance(node, ast.Call) and _call_name(node) in ("importorskip", "import_module") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value]
    return []


def _guarded(handler_types: list[ast.ExceptHandler]) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for handler in handler_types:
        t = handler.type
        if t is None or any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(t)):
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body: list[ast.stmt]):
    """The import statements and calls that run when a module body runs: not inside functions,
    not under ``if TYPE_CHECKING``, not in a ``try`` that catches the ImportError."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in stmt.decorator_list:
                yield from ast.walk(deco)
            continue
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _import_time_nodes(stmt.orelse)
            continue
        if isinstance(stmt, ast.Try):
            if not _guarded(stmt.handlers):
                yield from _import_time_nodes(stmt.body)
            for handler in stmt.handlers:
                yield from _import_time_nodes(handler.body)
            yield from _import_time_nodes(stmt.orelse + stmt.finalbody)
            continue
        if isinstance(stmt, (ast.ClassDef, ast.If, ast.For, ast.While, ast.With)):
            for field, value in ast.iter_fields(stmt):          # the header: bases, test, iter, items
                if field not in ("body", "orelse"):
                    for part in value if isinstance(value, list) else [value]:
                        if isinstance(part, ast.AST):
                            yield from ast.walk(part)
            yield from _import_time_nodes(stmt.body + getattr(stmt, "orelse", []))
            continue
        yield from ast.walk(stmt)


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve(modules) -> tuple[set[str], set[Path]]:
    """Split imported module names into ROS packages and the local files that run."""
    ros, local = set(), set()
    for module in modules:
        if not module:
            continue
        parts = module.split(".")
        if is_ros_package(parts[0]):
            ros.add(parts[0])
            continue
        for i in range(1, len(parts) + 1):        # a.b.c runs a/__init__, a/b/__init__, a/b/c
            path = _local_file(".".join(parts[:i]))
            if path is not None:
                local.add(path.resolve())
    return ros, local


@functools.cache
def _edges(path: Path) -> tuple[frozenset[str], frozenset[Path]]:
    names = [n for node in _import_time_nodes(_parse(path).body) for n in _imported_names(node, path)]
    ros, local = _resolve(names)
    return frozenset(ros), frozenset(local)


@functools.cache
def module_needs(path: Path) -> frozenset[str]:
    """The ROS packages that importing the module at ``path`` imports (local imports followed)."""
    out: set[str] = set()
    todo, seen = [Path(path).resolve()], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        ros, local = _edges(current)
        out |= ros
        todo.extend(local)
    return frozenset(out)


def _needs(modules) -> set[str]:
    ros, local = _resolve(modules)
    for path in local:
        ros |= module_needs(path)
    return ros


def _functions(path: Path) -> dict[str, ast.AST]:
    """Module-level functions and class methods of a module, by qualified name."""
    out: dict[str, ast.AST] = {}

    def visit(body, prefix):
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + stmt.name] = stmt
            elif isinstance(stmt, ast.ClassDef):
                visit(stmt.body, prefix + stmt.name + ".")
    visit(_parse(path).body, "")
    return out


def function_needs(path: Path, qualname: str) -> frozenset[str]:
    """The ROS packages a function of the module at ``path`` imports when it runs, following the
    calls it makes to other functions of the same module."""
    path = Path(path).resolve()
    functions = _functions(path)
    out: set[str] = set()
    todo, done = [qualname], set()
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done.add(name)
        for node in ast.walk(functions[name]):
            out |= _needs(_imported_names(node, path))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                todo.append(node.func.id)
    return frozenset(out)


def _function_site(fn) -> tuple[Path, str] | None:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        path = Path(inspect.getsourcefile(fn)).resolve()
    except (TypeError, OSError):
        return None
    if not any(root == path.parent or root in path.parents for root in LOCAL_ROOTS):
        return None
    return path, fn.__qualname__


def item_needs(item: pytest.Item) -> frozenset[str]:
    """The ROS packages one collected test imports: its module, its function, its fixtures."""
    if isinstance(item, RosUnavailable):
        return item.needs
    needs = set(module_needs(item.path)) if item.path.suffix == ".py" else set()
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    functions = [getattr(item, "function", None)] + [d.func for defs in fixtures.values() for d in defs]
    for fn in functions:
        site = _function_site(fn) if fn is not None else None
        if site is not None:
            needs |= module_needs(site[0]) | function_needs(*site)
    return frozenset(needs)


@functools.cache
def import_error(top_level: str) -> str | None:
    """Why a package cannot be imported here (None: it can). Imported for real: a ROS install
    whose libraries are missing is found by find_spec but fails here."""
    try:
        importlib.import_module(top_level)
    except Exception as exc:  # any failure to import means: not usable here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


# ------------------------------------------------------------------ hooks

class RosUnavailable(pytest.Item):
    """Stands in for a test module that needs ROS packages this environment cannot import."""

    def __init__(self, *, needs: frozenset[str], missing: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.needs, self.missing = needs, missing
        self.add_marker("ros")
        self.add_marker(pytest.mark.skip(reason=_cannot_import(missing)))

    def runtest(self):
        raise AssertionError("skipped by its marker")

    def reportinfo(self):
        return self.path, 0, self.name


class RosUnavailableModule(pytest.File):
    def __init__(self, *, needs: frozenset[str], missing: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.needs, self.missing = needs, missing

    def collect(self):
        yield RosUnavailable.from_parent(self, name=self.path.stem, needs=self.needs, missing=self.missing)


def _missing(needs) -> dict[str, str]:
    return {name: why for name in sorted(needs) if (why := import_error(name)) is not None}


def _cannot_import(missing: dict[str, str]) -> str:
    return "cannot import " + "; ".join(f"{name} ({why})" for name, why in missing.items())


def pytest_pycollect_makemodule(module_path, parent):
    needs = module_needs(module_path)
    missing = _missing(needs)
    if missing:
        return RosUnavailableModule.from_parent(parent, path=module_path, needs=needs, missing=missing)
    return None


@pytest.hookimpl(tryfirst=True)       # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = item_needs(item)
        if needs:
            item.add_marker("ros")
            missing = _missing(needs)
            if missing and not isinstance(item, RosUnavailable):
                item.add_marker(pytest.mark.skip(reason=_cannot_import(missing)))
