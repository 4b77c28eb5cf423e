"""Build the kit's services for one preset and one data folder. No Gradio here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kit.describe import DescribeService
from kit.gallery import GalleryStore
from kit.generate import GenerationResult, GeneratorService, result_settings_for_entry
from kit.models import ModelManager
from kit.presets import Preset

logger = logging.getLogger(__name__)


@dataclass
class Services:
    preset: Preset
    data_dir: Path
    models: ModelManager
    generator: GeneratorService
    describer: DescribeService
    gallery: GalleryStore

    def close(self) -> None:
        self.models.close()


def build_services(preset: Preset, data_dir: Path, *, devices: list[str] | None = None) -> Services:
    data_dir = Path(data_dir).resolve()
    models = ModelManager(preset, data_dir, devices=devices)
    gallery = GalleryStore(data_dir).open()

    def save(result: GenerationResult, owner: str) -> list[str]:
        ids = []
        for index, image in enumerate(result.images):
            entry = gallery.add(image, result_settings_for_entry(result, index), owner)
            ids.append(entry.id)
        return ids

    generator = GeneratorService(preset, models, save=save if preset.features.gallery else None)
    describer = DescribeService(preset, models)
    return Services(preset, data_dir, models, generator, describer, gallery)
