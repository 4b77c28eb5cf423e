"""Resolve a preset's model reference to something ``from_pretrained`` can open.

References are a hub id (``org/name``), a local folder, or ``builtin:NAME``. A built-in name is
either a folder shipped in the repository's ``models/`` folder (the trained demo models,
``builtin:demo-sd`` and ``builtin:demo-blip``) or one of the tiny random-weight models that
the kit builds itself under the data folder (``builtin:tiny-sd`` and the others in
``kit.tiny.BUILDERS``). Offline mode is decided up front:
a hub model that is not cached fails in seconds with the command that downloads it, instead
of retrying for minutes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kit.errors import ModelUnavailable
from kit.families import FAMILIES, ModelFamily, family_for_pipeline_class

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# Trained models that ship with the repository, one folder per built-in name (tools/train_demo.py).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# Seconds to wait for the hub when a model is missing from the cache and the hub may be reachable.
HUB_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what the preset says
    path: str  # what from_pretrained receives: a folder or a hub id
    local_files_only: bool


def hub_offline(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_hint(model_id: str) -> str:
    return f"hf download {model_id}"


def resolve_source(reference: str, models_dir: Path, marker_file: str) -> ModelSource:
    """Find a model locally or confirm that the hub can provide it, without loading weights.

    ``marker_file`` is a file every copy of the model has (``model_index.json`` for a
    diffusers pipeline, ``config.json`` for a transformers model).
    """
    if reference.startswith(BUILTIN_PREFIX):
        path = builtin_folder(reference[len(BUILTIN_PREFIX) :], models_dir, marker_file)
        return ModelSource(reference, str(path), True)

    local = Path(reference).expanduser()
    if local.is_dir():
        if not (local / marker_file).is_file():
            raise ModelUnavailable(f"model folder {local} has no {marker_file}; is it a saved {marker_file.split('.')[0]} folder?")
        return ModelSource(reference, str(local), True)
    if reference.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model folder {reference} not found")

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(reference, marker_file)
    if isinstance(cached, str):
        return ModelSource(reference, reference, True)
    if hub_offline():
        raise ModelUnavailable(
            f"model {reference} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"Download it on a machine with access to the hub: `{download_hint(reference)}`"
        )
    _probe_hub(reference)
    return ModelSource(reference, reference, False)


def shipped_names(marker_file: str | None = None) -> list[str]:
    """Return the names of the model folders shipped in ``models/``, optionally only those with ``marker_file``."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(
        folder.name
        for folder in SHIPPED_MODELS_DIR.iterdir()
        if folder.is_dir() and (marker_file is None or (folder / marker_file).is_file())
    )


def builtin_folder(name: str, models_dir: Path, marker_file: str | None = None) -> Path:
    """Return the folder of a built-in model: the shipped copy in ``models/``, else a tiny model built in ``models_dir``.

    ``marker_file`` is the file the caller needs in the folder; without it, either a
    ``model_index.json`` or a ``config.json`` marks a shipped folder. Raises ModelUnavailable
    for a name that is neither shipped nor a tiny model.
    """
    shipped = SHIPPED_MODELS_DIR / name
    markers = (marker_file,) if marker_file else ("model_index.json", "config.json")
    if any((shipped / marker).is_file() for marker in markers):
        return shipped
    from kit.tiny import BUILDERS, ensure_tiny_model

    if name in BUILDERS:
        return ensure_tiny_model(name, models_dir)
    if shipped.is_dir():
        raise ModelUnavailable(
            f"built-in model folder {shipped} has no {' or '.join(markers)}: it is a different kind of model "
            "or an incomplete copy. The demo models are rebuilt with `python tools/train_demo.py`."
        )
    known = [*shipped_names(marker_file), *BUILDERS]
    raise ModelUnavailable(f"unknown built-in model {name!r}; expected one of {', '.join(known)}")


def _probe_hub(model_id: str) -> None:
    """Fail fast when the hub cannot be reached, because from_pretrained would retry for minutes."""
    from huggingface_hub import model_info

    try:
        model_info(model_id, timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot download now"
        raise ModelUnavailable(
            f"model {model_id} is not cached and the hub could not be reached "
            f"({type(exc).__name__}: {exc}). Download it first: `{download_hint(model_id)}`, "
            "or set HF_HUB_OFFLINE=1 to use only cached models"
        ) from None


def family_from_folder(folder: Path) -> ModelFamily | None:
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    return family_for_pipeline_class(class_name)


_BUILTIN_FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl"}


def resolve_family(reference: str, family: str) -> ModelFamily:
    """Return the preset's model family without loading the model.

    An explicit family wins. For ``auto`` the family comes from the pipeline class named in
    ``model_index.json`` when a copy is on disk, else Stable Diffusion's rules apply, which are
    the loosest (multiples of 8).
    """
    if family != "auto":
        return FAMILIES[family]
    if reference.startswith(BUILTIN_PREFIX):
        name = reference[len(BUILTIN_PREFIX) :]
        shipped = SHIPPED_MODELS_DIR / name
        if shipped.is_dir():
            return family_from_folder(shipped) or FAMILIES["sd"]
        return FAMILIES[_BUILTIN_FAMILIES.get(name, "sd")]
    local = Path(reference).expanduser()
    if local.is_dir():
        return family_from_folder(local) or FAMILIES["sd"]
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(reference, "model_index.json")
    if isinstance(cached, str):
        return family_from_folder(Path(cached).parent) or FAMILIES["sd"]
    return FAMILIES["sd"]
