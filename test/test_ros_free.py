"""The ROS-free half of the project works without ROS: ``pytest -m "not ros"`` passes in a
process where rclpy and every other ROS package cannot be imported (as after a plain
``pip install .`` without the ``ros`` extra), and runs every test that carries no ``ros``
marker; the package's modules outside its ROS side import there.

The block is a ``sitecustomize`` on PYTHONPATH, so the processes those tests start are
blocked too. Which names count as ROS packages is ``conftest.is_ros_package``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ROS_NAMES, ROS_PREFIXES, ROS_SUFFIXES

# The package's ROS side: the only modules that may need rclpy to import.
ROS_SIDE = ("scpo_ros.ros", "scpo_ros.nodes")

BLOCKER = f'''"""Test-only: make ROS 2's packages unimportable in this process (see test/test_ros_free.py)."""
import importlib.abc
import os
import sys

NAMES, PREFIXES, SUFFIXES = {sorted(ROS_NAMES)!r}, {ROS_PREFIXES!r}, {ROS_SUFFIXES!r}


class BlockRos(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in NAMES or top.startswith(PREFIXES) or top.endswith(SUFFIXES):
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (ROS blocked by the test)", name=fullname)
        return None


sys.meta_path.insert(0, BlockRos())

# chain to the sitecustomize this one shadows, if any (Debian's python has one)
_me, _here, _path = sys.modules[__name__], os.path.dirname(os.path.abspath(__file__)), sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
del sys.modules[__name__]
try:
    import sitecustomize  # noqa: F401
except ImportError:
    sys.modules[__name__] = _me
finally:
    sys.path[:] = _path
'''

# A pytest plugin that writes the selected test ids and each test's outcome to $ROS_FREE_REPORT.
REPORTER = '''import json
import os

_report = {"selected": [], "outcomes": {}}


def pytest_collection_finish(session):
    _report["selected"] = [item.nodeid for item in session.items]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        _report["outcomes"].setdefault(report.nodeid, [report.outcome, str(reason)])


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["ROS_FREE_REPORT"], "w") as f:
        json.dump(_report, f)
'''


def _env(tmp_path: Path, *, block: bool, report: Path) -> dict[str, str]:
    plugin = tmp_path / "plugin"
    plugin.mkdir(exist_ok=True)
    (plugin / "ros_free_report.py").write_text(REPORTER)
    paths = [str(plugin)]
    if block:
        blocker = tmp_path / "block"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(blocker))
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)        # colcon's (junit file, cache dir) are for the outer run
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["ROS_FREE_REPORT"] = str(report)
    return env


def _pytest(tmp_path: Path, *args: str, block: bool, name: str, timeout: float,
            marks: str = "not ros") -> tuple[dict, str]:
    report = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "pytest", "-m", marks, "-q", "-p", "no:cacheprovider", "-p", "ros_free_report",
           f"--ignore={Path(__file__).relative_to(REPO)}", *args, "test"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, block=block, report=report), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report.exists(), out
    data = json.loads(report.read_text())
    data["returncode"] = proc.returncode
    return data, out


def test_blocker_blocks_ros_and_nothing_else(tmp_path):
    env = _env(tmp_path, block=True, report=tmp_path / "unused.json")
    for module in ("rclpy", "std_msgs.msg", "rcl_interfaces.msg", "launch_ros"):
        code = f"import sys\ntry:\n    import {module}\nexcept ImportError:\n    sys.exit(0)\nsys.exit(3)"
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (module, proc.stdout, proc.stderr)
    proc = subprocess.run([sys.executable, "-c", "import numpy, rosbags.rosbag2, yaml, scpo_ros"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_package_imports_without_ros_outside_its_ros_side(tmp_path):
    code = """import importlib, json, pkgutil, sys
import scpo_ros
failed = {}
for info in pkgutil.walk_packages(scpo_ros.__path__, "scpo_ros."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        failed[info.name] = str(exc)
print(json.dumps(failed))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, block=True, report=tmp_path / "x.json"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    ros_free_failures = {m: e for m, e in failed.items() if not any(m == p or m.startswith(p + ".") for p in ROS_SIDE)}
    assert not ros_free_failures, ros_free_failures


@pytest.mark.slow
def test_ros_free_selection_passes_without_ros(tmp_path):
    # what -m "not ros" selects where ROS can be imported (or the same, where it cannot)
    expected, out = _pytest(tmp_path, "--collect-only", block=False, name="collected", timeout=600)
    assert expected["returncode"] == 0, out
    selected = set(expected["selected"])
    assert len(selected) >= 100, f"only {len(selected)} ROS-free tests collected"

    # blocked: the same tests collect (none lost to an import error or moved behind a placeholder) ...
    collected, out = _pytest(tmp_path, "--collect-only", block=True, name="blocked_collected", timeout=600)
    assert collected["returncode"] == 0, out
    assert set(collected["selected"]) == selected, (sorted(selected ^ set(collected["selected"])), out)
    # ... and the fast ones run and pass. The slow ROS-free tests (experiment smokes, long property
    # tests) already ran in the outer suite: running them twice would double the suite's longest
    # part for no import the fast ones do not make.
    fast = "not ros and not slow"
    blocked, out = _pytest(tmp_path, block=True, name="blocked", timeout=1200, marks=fast)
    assert blocked["returncode"] == 0, out
    outcomes = blocked["outcomes"]
    selected = set(blocked["selected"])
    assert selected and selected <= set(collected["selected"]), out
    failed = {n: o for n, o in outcomes.items() if o[0] == "failed"}
    assert not failed, (failed, out)
    ros_words = ("rclpy", "ROS", "ros2", "_msgs", "launch_ros")
    skipped_for_ros = {n: o[1] for n, o in outcomes.items() if o[0] == "skipped" and any(w in o[1] for w in ros_words)}
    assert not skipped_for_ros, f"tests without the ros marker skipped for ROS: {skipped_for_ros}"
    passed = [n for n, o in outcomes.items() if o[0] == "passed"]
    assert len(passed) >= 0.9 * len(selected), (len(passed), len(selected), out)
