"""fastsft.machine: the version report, the tested ranges (from the installed metadata, equal to
pyproject.toml's), the cache folder; and that it stays a leaf."""

import ast
import sys
from pathlib import Path

from packaging.requirements import Requirement

from fastsft import machine
from fastsft.cli import doctor

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_tested_ranges_are_pyprojects():
    """Doctor's ranges come from the installed metadata: the same as pyproject.toml says (a stale
    install, or a copy kept by hand, would differ)."""
    project = _pyproject()
    core, gpu = machine.tested_bounds()
    assert core == {(r := Requirement(s)).name: str(r.specifier) for s in project["dependencies"]}
    assert gpu == {
        (r := Requirement(s)).name: str(r.specifier) for s in project["optional-dependencies"]["gpu"]
    }
    rows = {r["package"]: r for r in doctor.check_versions()}
    assert (
        rows["transformers"]["tested"] == core["transformers"] and rows["unsloth"]["tested"] == gpu["unsloth"]
    )


def test_versions_name_every_package_and_python():
    v = machine.versions(extra=("no-such-package-x",))
    assert set(machine.PACKAGES) < set(v) and v["python"] and v["torch"]
    assert v["no-such-package-x"] is None


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "c"))
    assert machine.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FASTSFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert machine.cache_root() == tmp_path / "x" / "fastsft"


def test_machine_is_a_leaf():
    """run, doctor, guard and the benchmarks import it; it imports nothing of fastsft but errors."""
    tree = ast.parse((ROOT / "fastsft" / "machine.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.startswith(".") or m.startswith("fastsft")}
    assert ours <= {".errors", "fastsft.errors"}, ours
