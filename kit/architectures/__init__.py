"""Architecture configs of the hub models that the shipped presets use, for memory planning.

Each folder here has the layout of a hub repository with only its ``config.json`` and
``model_index.json`` files: no weights and no tokenizer files. Building the models from
these configs on the meta device gives their exact parameter counts without a download.

NOTE: the configs were written from the published hub configs. Fields that change neither
layer shapes nor parameter counts (for example ``sample_size`` of the UNets) may differ from
the hub copies. The VAE ``sample_size`` does matter, because diffusers decodes tiles of
that size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kit.errors import ModelUnavailable
from kit.memory import ComponentSize, component_sizes

logger = logging.getLogger(__name__)

ARCHITECTURES_DIR = Path(__file__).resolve().parent
BUILTIN_PREFIX = "builtin:"

# Hub model id -> folder under ARCHITECTURES_DIR.
ARCHITECTURES: dict[str, str] = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base-1.0",
    # SDXL-Turbo is a distillation of SDXL base 1.0 with the same layers.
    "stabilityai/sdxl-turbo": "sdxl-base-1.0",
    # SD-Turbo is a distillation of Stable Diffusion 2.1 with the same layers.
    "stabilityai/sd-turbo": "sd-turbo",
    "madebyollin/sdxl-vae-fp16-fix": "sdxl-vae-fp16-fix",
    "Salesforce/blip-image-captioning-large": "blip-image-captioning-large",
}


def resolve_config_folder(model_id: str) -> Path:
    """Find a folder with the configs of ``model_id``: this package, a local folder or the hub cache.

    Raises ValueError for ``builtin:`` models, which the kit builds itself (count the built
    folder with ``folder_component_sizes``), and ModelUnavailable when no config is found.
    """
    if model_id.startswith(BUILTIN_PREFIX):
        raise ValueError(
            f"{model_id} is built by the kit, not taken from the hub; build it with "
            "kit.tiny.ensure_tiny_model and count the folder with folder_component_sizes"
        )
    if model_id in ARCHITECTURES:
        return ARCHITECTURES_DIR / ARCHITECTURES[model_id]
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # Reads the local hub cache only; nothing is downloaded.
        return Path(snapshot_download(model_id, allow_patterns=["*.json"], local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelUnavailable(
            f"no architecture config for {model_id!r}: it is not one of {', '.join(sorted(ARCHITECTURES))}, "
            f"not a local folder and not in the Hugging Face cache ({exc.__class__.__name__}). "
            "Download the model once or give the path of its folder."
        ) from None


def meta_component_sizes(model_id: str, dtype_bytes: int | None) -> list[ComponentSize]:
    """Count the parameters of each component of a hub model without loading its weights."""
    return folder_component_sizes(resolve_config_folder(model_id), dtype_bytes)


def folder_component_sizes(folder: Path, dtype_bytes: int | None) -> list[ComponentSize]:
    """Build the models described in ``folder`` on the meta device and count their parameters.

    A folder with ``model_index.json`` is a diffusers pipeline: each component whose
    subfolder has a ``config.json`` is counted under its component name. A folder with only
    ``config.json`` is one model, counted under its class name.
    """
    from accelerate import init_empty_weights

    modules: dict[str, Any] = {}
    with init_empty_weights():
        index_file = folder / "model_index.json"
        if index_file.is_file():
            index = _read_json(index_file)
            for name, entry in index.items():
                if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
                    continue
                library, class_name = entry
                subfolder = folder / name
                if library is None or not (subfolder / "config.json").is_file():
                    continue
                modules[name] = _build_module(library, class_name, subfolder)
        elif (folder / "config.json").is_file():
            library, class_name = _single_model_class(folder)
            modules[class_name] = _build_module(library, class_name, folder)
        else:
            raise ModelUnavailable(f"{folder} has neither model_index.json nor config.json")
    return component_sizes(modules, dtype_bytes)


def pipeline_class_name(model_id: str) -> str | None:
    """Return the diffusers pipeline class named in a model's ``model_index.json``, if any."""
    index_file = resolve_config_folder(model_id) / "model_index.json"
    if not index_file.is_file():
        return None
    return _read_json(index_file).get("_class_name")


def vae_tile_size(model_id: str) -> int | None:
    """Return the tile side that diffusers decodes with VAE tiling on (the VAE's ``sample_size``).

    ``model_id`` is a pipeline or a standalone VAE; None when no VAE config is found.
    """
    folder = resolve_config_folder(model_id)
    for config_file in (folder / "vae" / "config.json", folder / "config.json"):
        if config_file.is_file():
            config = _read_json(config_file)
            if config.get("_class_name", "").startswith("Autoencoder"):
                size = config.get("sample_size")
                if isinstance(size, list):
                    size = size[0]
                return int(size) if size else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _single_model_class(folder: Path) -> tuple[str, str]:
    config = _read_json(folder / "config.json")
    if "_class_name" in config:
        return "diffusers", config["_class_name"]
    architectures = config.get("architectures") or []
    if architectures:
        return "transformers", architectures[0]
    raise ModelUnavailable(f"{folder / 'config.json'} names no model class (_class_name or architectures)")


def _build_module(library: str, class_name: str, folder: Path) -> Any:
    """Build one model from its config; the caller's init_empty_weights keeps it on the meta device."""
    if library == "diffusers":
        import diffusers

        model_class = getattr(diffusers, class_name, None)
        if model_class is None:
            raise ModelUnavailable(f"diffusers has no class {class_name!r} (named for {folder})")
        return model_class.from_config(model_class.load_config(folder))
    if library == "transformers":
        import transformers

        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            raise ModelUnavailable(f"transformers has no class {class_name!r} (named for {folder})")
        return model_class(transformers.AutoConfig.from_pretrained(folder))
    raise ModelUnavailable(f"library {library!r} of {folder} is not diffusers or transformers")
