"""The GPU install asks for nothing unsloth refuses: the `gpu` extra together with the core dependencies,
and each requirement of the README's GPU commands, admit no version that the installed unsloth /
unsloth_zoo wheels' METADATA (tests/install-test-extras.sh puts them in .cache/unsloth) refuse, torch
included (a plain `pip install torch` took 2.15, which unsloth 2026.10 refuses, so pip swapped the user's
CUDA build). Checked at the boundary versions of every specifier involved. And `fastsft doctor` names an
installed version outside those bounds with the pip command that fixes it (faked through machine.version)."""

from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fastsft import machine
from fastsft.cli import doctor

from _tiny import REPO

UNSLOTH_SITE = REPO / ".cache" / "unsloth"
# the GPU machine unsloth is installed on: its markers are evaluated for Linux x86_64
LINUX = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _specs(lines, env=LINUX) -> dict[str, SpecifierSet]:
    """{name: the intersection of its specifiers} over the requirements that apply on `env`."""
    out: dict[str, SpecifierSet] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        out[name] = out.get(name, SpecifierSet()) & req.specifier
    return out


def unsloth_requires() -> dict[str, SpecifierSet]:
    """What unsloth and unsloth_zoo require, from their installed METADATA, intersected."""
    dists = [
        d
        for d in metadata.distributions(path=[str(UNSLOTH_SITE)])
        if d.metadata["Name"].replace("-", "_").lower() in ("unsloth", "unsloth_zoo")
    ]
    if len(dists) < 2:
        pytest.skip(
            "unsloth / unsloth_zoo are not in .cache/unsloth (tests/install-test-extras.sh installs them)"
        )
    return _specs([r for d in dists for r in d.requires or []])


def ours() -> dict[str, SpecifierSet]:
    """What `pip install 'fastsft[gpu]'` asks for: the core dependencies and the gpu extra together."""
    project = _pyproject()
    core, gpu = _specs(project["dependencies"]), _specs(project["optional-dependencies"]["gpu"])
    return {n: core.get(n, SpecifierSet()) & gpu.get(n, SpecifierSet()) for n in core.keys() | gpu.keys()}


def readme_gpu_requirements() -> dict[str, SpecifierSet]:
    """The package requirements in the README's `## On a CUDA GPU` commands (`pip install 'torch<2.15'`)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## On a CUDA GPU") :]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    reqs = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["pip", "install"]:
            reqs += [w for w in words[2:] if not w.startswith(("-", ".", "/")) and "://" not in w]
    return _specs(reqs)


def probes(*specsets: SpecifierSet) -> list[Version]:
    """The versions where any of these specifiers changes its answer, and either side of them."""
    out = set()
    for ss in specsets:
        for spec in ss:
            text = spec.version.removesuffix(".*")
            v = Version(text)
            release = list(v.release) + [0] * (3 - len(v.release))
            out.add(v)
            for i in range(len(release)):
                up = release[: i + 1]
                up[-1] += 1
                out.add(Version(".".join(map(str, up))))
                if release[i] > 0:
                    down = release[: i + 1]
                    down[-1] -= 1
                    out.add(Version(".".join(map(str, down + [99]))))
            out.add(Version(".".join(map(str, release)) + ".post1"))
            if spec.version.endswith(".*"):
                out.add(Version(text + ".7"))
    return sorted(out)


def admitted_but_refused(mine: SpecifierSet, theirs: SpecifierSet) -> list[str]:
    return [str(v) for v in probes(mine, theirs) if v in mine and v not in theirs]


def test_the_probes_find_a_gap():
    """The check itself: `torch` (no bound) and `torch<2.15` against unsloth's torch range."""
    theirs = SpecifierSet(">=2.4.0,<2.15.0")
    assert "2.15.0" in admitted_but_refused(SpecifierSet(""), theirs)
    assert "2.3.99" in admitted_but_refused(SpecifierSet("<2.15"), theirs)  # below unsloth's >=2.4
    assert admitted_but_refused(SpecifierSet(">=2.6,<2.15"), theirs) == []
    assert "4.0.7" in admitted_but_refused(SpecifierSet(">=3.2,<5"), SpecifierSet("!=4.0.*,<5"))


def test_the_gpu_install_admits_nothing_unsloth_refuses():
    theirs, mine = unsloth_requires(), ours()
    assert "torch" in theirs and "torch" in mine  # the bound this test exists for
    gaps = {
        n: (str(mine[n]), str(theirs[n]), admitted_but_refused(mine[n], theirs[n]))
        for n in theirs.keys() & mine.keys()
    }
    gaps = {n: g for n, g in gaps.items() if g[2]}
    assert not gaps, f"core + gpu extra admit versions unsloth refuses: {gaps}"


def test_the_readme_gpu_commands_admit_nothing_unsloth_refuses():
    theirs, asked = unsloth_requires(), readme_gpu_requirements()
    assert "torch" in asked, "the README's GPU commands should install a bounded torch"
    gaps = {
        n: (str(asked[n]), admitted_but_refused(asked[n], theirs[n])) for n in asked.keys() & theirs.keys()
    }
    gaps = {n: g for n, g in gaps.items() if g[1]}
    assert not gaps, f"README GPU commands admit versions unsloth refuses: {gaps}"


@pytest.fixture
def fake(monkeypatch):
    """doctor on the source tree's bounds (pyproject.toml), with the installed versions given."""
    project = _pyproject()

    def bounds(lines):
        return {(r := Requirement(s)).name: str(r.specifier) for s in lines}

    monkeypatch.setattr(
        machine,
        "tested_bounds",
        lambda: (bounds(project["dependencies"]), bounds(project["optional-dependencies"]["gpu"])),
    )
    real = machine.version

    def install(**versions):
        monkeypatch.setattr(machine, "version", lambda p: versions[p] if p in versions else real(p))
        return {r["package"]: r for r in doctor.check_versions()}

    return install


def test_doctor_names_a_torch_unsloth_refuses_with_the_fix(fake):
    rows = fake(unsloth="2026.10.7", unsloth_zoo="2026.10.7", torch="2.15.0")
    row = rows["torch"]
    assert not row["ok"] and row["note"].startswith("unsloth needs torch<2.15"), row
    command = re.search(r"pip install '([^']+)'", row["note"])
    assert command, row
    fix = Requirement(command.group(1))
    assert (
        fix.name == "torch" and Version("2.15.0") not in fix.specifier and Version("2.14.1") in fix.specifier
    )
    assert (
        Version("2.5.0") not in fix.specifier
    )  # the core's torch>=2.6 too: the fix never trades one for the other
    assert fake(unsloth=None, unsloth_zoo=None, torch="2.15.0")["torch"]["ok"]  # without unsloth 2.15 is fine
    assert fake(unsloth="2026.10.7", unsloth_zoo="2026.10.7", torch="2.14.1")["torch"]["ok"]


def test_doctor_names_other_packages_outside_the_bounds_with_the_fix(fake):
    rows = fake(unsloth="2026.10.7", unsloth_zoo="2026.10.7", xformers="0.0.27", datasets="4.0.0")
    assert not rows["xformers"]["ok"] and "pip install 'xformers>=0.0.27.post2'" in rows["xformers"]["note"]
    assert not rows["datasets"]["ok"] and "pip install 'datasets" in rows["datasets"]["note"], rows[
        "datasets"
    ]
    rows = fake(unsloth=None, transformers="5.26.0")  # outside the core's range, no unsloth
    assert not rows["transformers"]["ok"]
    assert (
        rows["transformers"]["note"]
        == "outside the tested range <=5.25,>=5.2: pip install 'transformers<=5.25,>=5.2'"
    )
    assert fake(unsloth=None, transformers="5.25.0")["transformers"]["ok"]  # the core admits the newest
    rows = fake(unsloth="2026.10.7", unsloth_zoo="2026.10.7", transformers="5.25.0")  # but unsloth does not
    assert not rows["transformers"]["ok"] and rows["transformers"]["note"].startswith(
        "unsloth needs transformers"
    ), rows["transformers"]


def test_the_core_admits_the_newest_stack_and_the_gpu_extra_holds_unsloths_caps():
    """Issue 38: `pip install fastsft` next to transformers 5.25 / datasets 5 / TRL 1.16 keeps them; the
    `gpu` extra alone holds what unsloth accepts."""
    project = _pyproject()
    core, gpu = _specs(project["dependencies"]), _specs(project["optional-dependencies"]["gpu"])
    for pkg, newest in (("transformers", "5.25.0"), ("datasets", "5.2.0"), ("trl", "1.16.0")):
        assert Version(newest) in core[pkg], (pkg, core[pkg])
        assert Version(newest) not in gpu[pkg], (pkg, gpu[pkg])
    assert Version("1.15.0") in core["trl"] and Version("5.17.0") in gpu["transformers"]


def test_doctor_says_which_set_is_installed(fake, monkeypatch):
    project = _pyproject()

    def bounds(lines):
        return {(r := Requirement(s)).name: str(r.specifier) for s in lines}

    core, gpu = bounds(project["dependencies"]), bounds(project["optional-dependencies"]["gpu"])
    fake(transformers="5.25.0", datasets="5.2.0", trl="1.16.0", torch="2.13.0")
    newest = doctor.installed_set(core, gpu)
    assert newest.startswith("the newest core set") and "transformers 5.25.0" in newest, newest
    assert "datasets 5.2.0" in newest and "trl 1.16.0" in newest
    fake(transformers="5.17.0", datasets="4.8.5", trl="1.15.0", torch="2.13.0")
    assert doctor.installed_set(core, gpu).startswith("the Unsloth-bounded set")
    assert set(doctor.BOUND_REASONS) >= {"transformers", "trl", "datasets", "torch"}
