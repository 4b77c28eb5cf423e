"""Resolve a preset's model reference to something ``from_pretrained`` can open.

References are a hub id (``org/name``), a local folder, or ``builtin:NAME`` for the tiny
models that the kit builds itself under the data folder. Offline mode is decided up front:
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
        from kit.tiny import ensure_tiny_model

        name = reference[len(BUILTIN_PREFIX) :]
        try:
            path = ensure_tiny_model(name, models_dir)
        except ValueError as exc:
            raise ModelUnavailable(str(exc)) from None
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
        return FAMILIES[_BUILTIN_FAMILIES.get(reference[len(BUILTIN_PREFIX) :], "sd")]
    local = Path(reference).expanduser()
    if local.is_dir():
        return family_from_folder(local) or FAMILIES["sd"]
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(reference, "model_index.json")
    if isinstance(cached, str):
        return family_from_folder(Path(cached).parent) or FAMILIES["sd"]
    return FAMILIES["sd"]
