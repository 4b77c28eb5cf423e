"""Build the kit's services for one preset and one data folder. No Gradio here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kit.cancels import CancelHooks
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
    cancel_hooks: CancelHooks = field(default_factory=CancelHooks)

    @property
    def model_concurrency(self) -> int:
        """Model jobs that Gradio may hand to the kit at once.

        The model manager still runs one pipeline call per replica at a time. Twice
        ``max_batch_size`` jobs per call are let in: one batch on the model and the next one
        already waiting, so the model starts it the moment the last call ends instead of
        idling while Gradio sends that call's results and admits new jobs.
        """
        per_replica = self.preset.queue.concurrency_per_replica * self.generator.max_batch_size * 2
        return self.models.replica_count * per_replica

    def close(self) -> None:
        self.generator.close()
        self.models.close()


def build_services(preset: Preset, data_dir: Path, *, devices: list[str] | None = None) -> Services:
    data_dir = Path(data_dir).resolve()
    models = ModelManager(preset, data_dir, devices=devices)
    gallery = GalleryStore(data_dir).open()

    def save(result: GenerationResult, owner: str) -> list[str]:
        # All of a job's images are saved or none are, so a failed save leaves no half job.
        items = [(image, result_settings_for_entry(result, i)) for i, image in enumerate(result.images)]
        return [entry.id for entry in gallery.add_many(items, owner)]

    generator = GeneratorService(preset, models, save=save if preset.features.gallery else None)
    describer = DescribeService(preset, models)
    return Services(preset, data_dir, models, generator, describer, gallery)
