"""Live previews: latents to RGB per model family, and previews coming out of a running job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kit.generate
from kit.generate import GenerationRequest
from kit.preview import LATENT_RGB_MAPS, latents_to_rgb, preview_image, unpack_flux_latents
from tests.conftest import demo_preset


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack (batch, channels, h, w) into Flux's (batch, h/2 * w/2, channels * 4) token layout."""
    batch, channels, height, width = latents.shape
    grid = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(batch, (height // 2) * (width // 2), channels * 4)


def tiny_preset():
    generator = {
        "model": "builtin:tiny-sd",
        "defaults": {"steps": 2, "width": 64, "height": 64},
        "limits": {"min_size": 64, "max_size": 128, "max_steps": 50},
    }
    return demo_preset(generator=generator, describe={"model": "builtin:tiny-blip"})


@pytest.mark.parametrize("family", sorted(LATENT_RGB_MAPS))
def test_zero_latents_give_bias_colour(family):
    factors, bias = LATENT_RGB_MAPS[family]
    rgb = latents_to_rgb(torch.zeros(1, len(factors), 4, 6), family)
    assert rgb.shape == (4, 6, 3)
    assert rgb.dtype == np.uint8
    expected = [round((b + 1) * 127.5) for b in bias]
    assert rgb[0, 0].tolist() == expected


def test_sd_channel_maps_to_its_row():
    latents = torch.zeros(4, 2, 2)
    latents[0] = 1.0
    rgb = latents_to_rgb(latents, "sd")
    expected = [round((value + 1) * 127.5) for value in LATENT_RGB_MAPS["sd"][0][0]]
    assert rgb[1, 1].tolist() == expected


def test_values_are_clamped_to_range():
    rgb = latents_to_rgb(torch.full((1, 4, 2, 2), 1000.0), "sd")
    assert rgb.min() >= 0
    assert rgb.max() <= 255


def test_first_image_of_batch_is_used():
    latents = torch.zeros(2, 4, 2, 2)
    latents[1] = 5.0
    assert latents_to_rgb(latents, "sd").tolist() == latents_to_rgb(torch.zeros(4, 2, 2), "sd").tolist()


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="need latents with 16 channels"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8), "sd3")


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="no latent preview map"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8), "kandinsky")


def test_preview_upscaled_keeps_aspect_ratio():
    image = preview_image(torch.randn(1, 4, 16, 24), "sdxl")
    assert image.size == (256, 171)
    assert image.mode == "RGB"


def test_large_preview_not_upscaled():
    image = preview_image(torch.randn(1, 4, 128, 128), "sd", max_side=64)
    assert image.size == (128, 128)


def test_flux_unpack_inverts_pack():
    latents = torch.randn(2, 16, 8, 12)
    packed = pack_flux_latents(latents)
    assert torch.equal(unpack_flux_latents(packed, height=64, width=96), latents)


def test_flux_packed_preview_matches_unpacked():
    latents = torch.randn(1, 16, 8, 12)
    packed = pack_flux_latents(latents)
    from_packed = preview_image(packed, "flux", height=64, width=96)
    from_grid = preview_image(latents, "flux")
    assert from_packed.size == (256, 171)
    assert np.array_equal(np.asarray(from_packed), np.asarray(from_grid))


def test_flux_packed_needs_size():
    with pytest.raises(ValueError, match="height and width"):
        preview_image(torch.randn(1, 24, 64), "flux")


def test_flux_token_count_mismatch_is_rejected():
    with pytest.raises(ValueError, match="packed latents have 24 tokens"):
        unpack_flux_latents(torch.randn(1, 24, 64), height=128, width=128)


def job_updates(services, steps: int, width: int = 64, height: int = 64) -> list:
    """Run one job to the end and return its progress updates, without the idle Nones."""
    job = services.generator.start(GenerationRequest(prompt="a red circle", steps=steps, width=width, height=height), owner="browser:x")
    updates = [update for update in job.progress() if update is not None]
    job.wait(60)
    return updates


def test_job_sends_previews_during_steps(make_services):
    updates = job_updates(make_services(tiny_preset()), steps=4)
    previews = [update for update in updates if update.preview is not None]
    assert previews, "no step update carried a preview"
    assert all(update.kind == "step" and update.step >= 1 for update in previews)
    assert previews[0].preview.size == (64, 64)  # never larger than the image itself


def test_preview_size_capped_for_large_images(make_services):
    updates = job_updates(make_services(tiny_preset()), steps=2, width=384, height=256)
    previews = [update.preview for update in updates if update.preview is not None]
    assert previews
    assert previews[0].size == (256, 171)


def test_previews_limited_per_second(make_services, monkeypatch):
    monkeypatch.setattr(kit.generate, "PREVIEW_INTERVAL_SECONDS", 3600.0)
    monkeypatch.setattr(kit.generate, "PROGRESS_INTERVAL_SECONDS", 0.0)
    updates = job_updates(make_services(tiny_preset()), steps=5)
    steps = [update for update in updates if update.kind == "step" and update.step >= 1]
    assert len(steps) == 5
    assert sum(update.preview is not None for update in steps) == 1


def test_step_updates_limited_per_second(make_services, monkeypatch):
    monkeypatch.setattr(kit.generate, "PREVIEW_INTERVAL_SECONDS", 3600.0)
    monkeypatch.setattr(kit.generate, "PROGRESS_INTERVAL_SECONDS", 3600.0)
    updates = job_updates(make_services(tiny_preset()), steps=6)
    steps = [update.step for update in updates if update.kind == "step"]
    assert steps == [0, 1, 6]  # before denoising, the first step (with the preview), the last step
