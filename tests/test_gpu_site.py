"""Every package fastsft imports on the GPU path is on the GPU machines' image
(../shared/gpu/image-packages.txt) or in the archive that ../shared/gpu/build-site.sh packs; and so is
every requirement of what the archive adds (TRL, Unsloth, datasets, ...), as their metadata declares it
for the image's Python 3.12 on Linux. A package missing from both would fail on the GPU machine, which
has no network (a run died there on tomli-w before build-site.sh packed it)."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("os").environ.get("FASTSFT_SHARED", REPO.parent / "shared")) / "gpu"
IMAGE, BUILD_SITE = SHARED / "image-packages.txt", SHARED / "build-site.sh"
# the image's interpreter, for the requirements' environment markers
IMAGE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
# imports of fastsft that are not on the one-GPU path, with why
NOT_ON_THE_GPU_PATH = {
    "deepspeed": "fastsft/dist.py: only [distributed] strategy = 'deepspeed-zero3', several GPUs",
    "tomli": "fastsft/recipe.py: Python < 3.11 only; the image has 3.12 (tomllib)",
    "llama_cpp": "fastsft/export/gguf.py: only the K-quant GGUF exports (q4_k_m, q5_k_m, q6_k), after training; "
    "llama-cpp-python builds llama.cpp from source (minutes), and the export asks for it by name",
}
# requirements of the archive's packages that are left out on purpose (build-site.sh says why)
LEFT_OUT = {
    "xformers": "PyPI's wheel links CUDA 12's runtime, which CUDA 13 torch cannot load (build-site.sh)",
}
# requirements unsloth / unsloth_zoo declare that neither imports when loaded (only inside functions of
# other features, or under try: QAT, diffusion models, faster Hub downloads, a pydantic warning filter);
# test_lazy_requirements_are_not_imported_at_load checks that in their sources
LAZY = {"torchao", "diffusers", "hf-transfer", "pydantic"}
# import name -> distribution, where they differ and the venv cannot say (not installed here)
DIST_OF = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "tomli_w": "tomli-w",
    "jinja2": "jinja2",
    "sklearn": "scikit-learn",
}

pytestmark = pytest.mark.skipif(
    not (IMAGE.exists() and BUILD_SITE.exists()),
    reason=f"{SHARED} (the GPU image's package list and build-site.sh) is not beside the repository",
)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    out = set()
    for line in IMAGE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(norm(re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0]))
    return out


def archive_packages() -> set[str]:
    """The names in build-site.sh's `pkgs=( ... )` array (comments and version bounds dropped)."""
    text = BUILD_SITE.read_text()
    body = re.search(r"^pkgs=\((.*?)^\)", text, re.S | re.M).group(1)
    out = set()
    for line in body.splitlines():
        for tok in line.split("#", 1)[0].split():
            out.add(norm(re.split(r"[=<>!~\[ ;]", tok.strip("'\""), maxsplit=1)[0]))
    return out


def fastsft_imports() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in fastsft/ and kernels/ (lazy imports too), with where."""
    found: dict[str, list[str]] = {}
    for root in ("fastsft", "kernels"):
        for f in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "fastsft":
                        found.setdefault(top, []).append(f"{f.relative_to(REPO)}:{node.lineno}")
    return found


def dist_of(module: str) -> str:
    dists = metadata.packages_distributions().get(module)
    return norm(dists[0]) if dists else norm(DIST_OF.get(module, module))


def test_the_lists_parse():
    image, archive = image_packages(), archive_packages()
    assert {"torch", "transformers", "triton", "peft", "accelerate"} <= image, sorted(image)[:20]
    assert {"trl", "unsloth", "bitsandbytes", "tomli-w", "liger-kernel"} <= archive, sorted(archive)


def test_every_package_fastsft_imports_is_on_the_image_or_in_the_archive():
    have = image_packages() | archive_packages()
    missing = {}
    for module, where in fastsft_imports().items():
        if module in NOT_ON_THE_GPU_PATH:
            continue
        if dist_of(module) not in have:
            missing[dist_of(module)] = where[:3]
    assert not missing, (
        f"on neither {IMAGE.name} nor in {BUILD_SITE.name}'s pkgs (add it there, or to NOT_ON_THE_GPU_PATH "
        f"with the reason): {missing}"
    )


def _metadata_paths() -> list[str]:
    """This venv, and the test extras' sites (.cache/unsloth: unsloth + unsloth_zoo; .cache/trl-1.15)."""
    extra = [REPO / ".cache" / "unsloth", REPO / ".cache" / "trl-1.15"]
    return [str(p) for p in extra if p.is_dir()] + sys.path


def test_what_the_archive_adds_has_its_requirements_on_the_image_or_in_the_archive():
    """Requirement by requirement (no extras), through every archive package whose metadata is here."""
    image, archive = image_packages(), archive_packages()
    paths = _metadata_paths()
    missing, read, todo, seen = {}, [], sorted(archive), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        dists = [d for d in metadata.distributions(path=paths) if norm(d.metadata["Name"] or "") == name]
        if not dists:
            continue  # no metadata here (not installed in this venv): nothing to read
        read.append(name)
        for spec in dists[0].requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
                continue  # an extra's, or another platform's / Python's
            dep = norm(req.name)
            if dep in image or dep in LEFT_OUT or dep in LAZY:
                continue
            if dep in archive:
                todo.append(dep)
            else:
                missing.setdefault(dep, []).append(name)
    assert {"trl", "unsloth", "unsloth-zoo"} <= set(read) or not (REPO / ".cache" / "unsloth").is_dir(), read
    assert not missing, (
        f"required by the archive's packages, on neither list: {missing} (read: {sorted(read)})"
    )


def _loaded_at_import(tree: ast.Module) -> set[str]:
    """Top-level modules a file imports when it is loaded: module-level imports, not under try or in defs."""
    out = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.If):  # version checks at module level still run at load
            stack += node.body + node.orelse
    return out


def test_lazy_requirements_are_not_imported_at_load():
    site = REPO / ".cache" / "unsloth"
    if not site.is_dir():
        pytest.skip(".cache/unsloth is not installed (tests/install-test-extras.sh)")
    modules = {m.replace("-", "_") for m in LAZY}
    hits = []
    for pkg in ("unsloth", "unsloth_zoo"):
        for f in (site / pkg).rglob("*.py"):
            try:
                tree = ast.parse(f.read_text(errors="replace"))
            except SyntaxError:
                continue
            hits += [f"{f.relative_to(site)}: {m}" for m in _loaded_at_import(tree) & modules]
    assert not hits, f"imported at load, so needed on the GPU image: {hits}"
