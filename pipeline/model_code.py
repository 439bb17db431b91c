"""The user's model code that travels with a signed model, so it loads where the project never was.

At release, the top-level module of each name the signed `model.json` imports (the class path, the `model_forward`
hook) is either bundled or required: a package installed from an index (in site-packages) becomes a pinned
requirement; anything else (the config's project folder, an editable install) has its Python sources copied into
the signed directory's `code/` folder, so the model signature and the attestation cover them like the weights.
Loading puts that code on `sys.path` only after the directory verified, from a copy whose digests are rechecked.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import site
import sys
import tempfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions, version
from pathlib import Path

from trainguard.pipeline.errors import CycleAbortedError, ModelSignatureError
from trainguard.pipeline.model_sign import CODE_DIR, file_sha256

_LOADER = "trainguard"  # the loader itself: installed where `trainguard.load_model` runs, bundled for MLflow


@dataclass(frozen=True)
class ModelCode:
    """What a model's own modules need to load elsewhere: source files to sign into `code/` (name under `code/`
    -> file) and pinned requirements for the installed packages it imports from."""

    files: Mapping[str, Path]
    requirements: tuple[str, ...]


def find_model_code(names: Iterable[str]) -> ModelCode:
    """The code behind dotted import names (`mymodel.TinyNet`, `mymodel.masked_forward`): see the module docstring.

    Args:
        names: The dotted names a signed model imports; standard-library and trainguard names need nothing.

    Returns:
        The sources to bundle and the requirements to declare.

    Raises:
        CycleAbortedError: A module that is neither installed from a package nor has Python sources to bundle.
    """
    files: dict[str, Path] = {}
    requirements: set[str] = set()
    for top in sorted({name.split(".")[0] for name in names}):
        if top in sys.stdlib_module_names or top == _LOADER:
            continue
        spec = importlib.util.find_spec(top)
        places = [*(spec.submodule_search_locations or []), *([spec.origin] if spec.origin else [])] if spec else []
        installed = _distributions().get(top, []) if places and all(map(_in_site_packages, places)) else []
        if installed:
            requirements.update(pinned(distribution) for distribution in installed)
            continue
        found = module_sources(top)
        if not found:
            raise CycleAbortedError(f"{top}: the model imports it, but it has no Python sources to bundle", "release")
        files.update(found)
    return ModelCode(files, tuple(sorted(requirements)))


def module_sources(name: str) -> dict[str, Path]:
    """The `.py` files of module `name` by their path as it installs (`a/b/__init__.py`, `a/b/c.py`): a package's
    whole tree or the one module; nothing where it has no Python source. The module itself is found, not imported.

    Args:
        name: A dotted module name.

    Returns:
        Each source file by its path under a folder on `sys.path`.
    """
    spec = importlib.util.find_spec(name)
    prefix = name.replace(".", "/")
    if spec is None or not spec.submodule_search_locations:
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        return {f"{prefix}.py": origin} if origin is not None and origin.suffix == ".py" else {}
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": path
        for folder in map(Path, spec.submodule_search_locations)
        for path in sorted(folder.rglob("*.py"))
        if "__pycache__" not in path.relative_to(folder).parts
    }


def model_imports(class_path: str | None, model_forward: str | None) -> tuple[str, ...]:
    """The dotted names a signed model imports when it is built: its class and its `model_forward` hook.

    Args:
        class_path: The module's class path (None: a bare state dict).
        model_forward: The `model_forward` hook, if the model has one.

    Returns:
        The names given, in that order.
    """
    return tuple(name for name in (class_path, model_forward) if name)


def pinned(distribution: str, extras: Collection[str] = ()) -> str:
    """`NAME[EXTRAS]==VERSION` of an installed distribution, without a local label (`2.13.0+cpu` -> `2.13.0`),
    which no package index serves; the pin still matches the local build where one is kept.

    Args:
        distribution: An installed distribution's name.
        extras: Its extras to require too.

    Returns:
        The requirement a package index resolves.
    """
    named = f"{distribution}[{','.join(sorted(extras))}]" if extras else distribution
    return f"{named}=={version(distribution).split('+')[0]}"


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Which installed distributions provide each top-level module (read once: a scan of every installed one)."""
    return packages_distributions()


def _in_site_packages(path: str) -> bool:
    """Whether `path` lies in one of this interpreter's site-packages folders (installed from a package)."""
    roots = [Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())]
    return any(Path(path).resolve().is_relative_to(root) for root in roots)


def use_verified_code(directory: Path, digests: Mapping[str, str]) -> None:
    """Puts a verified model directory's `code/` first on `sys.path`, from a private copy (kept until the process
    exits: the model's modules may import more later) whose files are rechecked against the verified digests. A
    module of the same name this process already imported (the project's own, where a cycle ran) stays in use.

    Args:
        directory: The signed model directory, verified.
        digests: The verified sha256 of each signed file, by name relative to `directory`.

    Raises:
        ModelSignatureError: A code file changed after it was verified, or one the signature did not cover.
    """
    source = directory / CODE_DIR
    if not source.is_dir():
        return
    copy = Path(tempfile.mkdtemp(prefix="trainguard-code-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copytree(source, copy / CODE_DIR)
    for path in sorted(p for p in (copy / CODE_DIR).rglob("*") if not p.is_dir()):
        name = path.relative_to(copy).as_posix()
        if digests.get(name) != file_sha256(path):
            raise ModelSignatureError(f"{directory / name}: changed after it was verified", path=str(directory))
    sys.path.insert(0, str(copy / CODE_DIR))
