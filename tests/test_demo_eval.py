"""The shipped demo models draw and describe the shapes world of kit.demo_world.

Held-out prompts and images are scenes that training never showed
(``kit.demo_world.HELD_OUT_SCENES``), drawn with seeds that training did not use either.
The thresholds sit below the figures recorded in docs/benchmarks.md ("Demo models"), so a
retrained model that is as good passes and a broken one fails.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kit import demo_world
from kit.loading import SHIPPED_MODELS_DIR, resolve_source
from kit.presets import load_preset

pytestmark = pytest.mark.slow

MIN_CLASSIFIER_ACCURACY = 0.95
MIN_GENERATOR_ACCURACY = 0.8
MIN_CAPTIONER_ACCURACY = 0.8
MIN_ROUND_TRIP_ACCURACY = 0.8
MAX_WEIGHTS_BYTES = 20 * 2**20


def held_out(count: int, seed: int) -> tuple[list, list[demo_world.Scene]]:
    rng = random.Random(seed)
    scenes = demo_world.held_out_scenes(rng, count)
    return [demo_world.render(scene, rng) for scene in scenes], scenes


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


@pytest.fixture(scope="module")
def demo_services(tmp_path_factory: pytest.TempPathFactory):
    from kit.services import build_services

    services = build_services(load_preset("demo"), tmp_path_factory.mktemp("demo-data"), devices=["cpu"])
    yield services
    services.close()


@pytest.fixture(scope="module")
def pipeline():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODELS_DIR / "demo-sd", local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_classifier_reads_rendered_scenes():
    rng = random.Random(7)
    scenes = [demo_world.sample_scene(rng) for _ in range(300)]
    readings = [demo_world.classify(demo_world.render(scene, rng)).facts() for scene in scenes]

    backgrounds = [reading.background == scene.background for scene, reading in zip(scenes, readings)]
    shapes = [sorted(reading.shapes) == sorted(demo_world.scene_facts(scene).shapes) for scene, reading in zip(scenes, readings)]
    assert share(backgrounds) >= MIN_CLASSIFIER_ACCURACY
    assert share(shapes) >= MIN_CLASSIFIER_ACCURACY


def test_caption_parser_round_trips():
    rng = random.Random(8)
    for _ in range(50):
        scene = demo_world.sample_scene(rng)
        assert demo_world.parse_caption(scene.caption()) == demo_world.scene_facts(scene), scene.caption()


def test_demo_preset_uses_shipped_models(tmp_path: Path):
    preset = load_preset("demo")

    generator = resolve_source(preset.generator.model, tmp_path, "model_index.json")
    captioner = resolve_source(preset.describe.model, tmp_path, "config.json")
    assert Path(generator.path) == SHIPPED_MODELS_DIR / "demo-sd"
    assert Path(captioner.path) == SHIPPED_MODELS_DIR / "demo-blip"
    assert not list(tmp_path.iterdir()), "shipped models must not be built into the data folder"
    weights = sum(path.stat().st_size for path in SHIPPED_MODELS_DIR.rglob("*.safetensors"))
    assert weights < MAX_WEIGHTS_BYTES


def test_generator_draws_held_out_prompts(pipeline):
    import torch

    images, scenes = held_out(demo_world.HELD_OUT_COUNT, seed=501)
    prompts = [scene.caption() for scene in scenes]
    generators = [torch.Generator().manual_seed(900 + index) for index in range(len(prompts))]
    preset = load_preset("demo").generator.defaults
    drawn = pipeline(
        prompts,
        num_inference_steps=preset.steps,
        guidance_scale=preset.guidance_scale,
        width=preset.width,
        height=preset.height,
        generator=generators,
    ).images

    readings = [demo_world.classify(image).facts() for image in drawn]
    matches = [demo_world.facts_match(demo_world.scene_facts(scene), reading) for scene, reading in zip(scenes, readings)]
    misses = [(prompt, reading) for prompt, reading, ok in zip(prompts, readings, matches) if not ok]
    assert share(matches) >= MIN_GENERATOR_ACCURACY, misses


def test_captioner_names_held_out_scenes(demo_services):
    images, scenes = held_out(demo_world.HELD_OUT_COUNT, seed=502)
    captions = [demo_services.describer.describe(image) for image in images]

    parsed = [demo_world.parse_caption(caption) for caption in captions]
    shapes = [facts.shapes == demo_world.scene_facts(scene).shapes for facts, scene in zip(parsed, scenes)]
    backgrounds = [facts.background == scene.background for facts, scene in zip(parsed, scenes)]
    misses = [(scene.caption(), caption) for scene, caption, ok in zip(scenes, captions, shapes) if not ok]
    assert share(shapes) >= MIN_CAPTIONER_ACCURACY, misses
    assert share(backgrounds) >= MIN_CAPTIONER_ACCURACY


def test_describe_then_generate_reproduces_scene(demo_services, tmp_path: Path):
    images, scenes = held_out(demo_world.HELD_OUT_COUNT, seed=503)
    outcomes = []
    for index, (image, scene) in enumerate(zip(images, scenes)):
        path = tmp_path / f"scene-{index}.png"
        image.save(path)
        caption = demo_services.describer.describe(str(path))
        request = demo_services.generator.check({"prompt": caption, "seed": 40 + index})
        drawn = demo_services.generator.generate(request).images[0]
        reading = demo_world.classify(drawn).facts()
        outcomes.append((scene.caption(), caption, reading, demo_world.facts_match(demo_world.scene_facts(scene), reading)))

    assert share([ok for *_, ok in outcomes]) >= MIN_ROUND_TRIP_ACCURACY, [o for o in outcomes if not o[-1]]
