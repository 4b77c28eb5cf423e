"""The generator service on the tiny Stable Diffusion model: rules, pixels, cancel, guards."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kit.errors import GenerationFailed, InvalidRequest, JobCancelled
from kit.families import FAMILIES
from kit.generate import MAX_SEED, GenerationRequest, check_inputs
from tests.conftest import demo_preset

SD = FAMILIES["sd"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a red circle", seed=1234, steps=3, guidance_scale=5.0, width=64, height=64, num_images=1)
    values.update(changes)
    return GenerationRequest(**values)


def small_preset(**generator):
    limits = {"min_size": 64, "max_size": 256, "max_steps": 500}
    return demo_preset(generator={"limits": limits, **generator})


# -- check_inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "parameter", "fragment"),
    [
        ({"width": 1000}, "width", "between 64 and 512"),
        ({"width": 427}, "width", "multiple of 8 for this model, got 427; the nearest valid width is 424"),
        ({"height": 100}, "height", "nearest valid height is 96"),
        ({"steps": 0}, "steps", "between 1 and 200, got 0"),
        ({"steps": "many"}, "steps", "whole number"),
        ({"num_images": 9}, "num_images", "between 1 and 4, got 9"),
        ({"seed": 2**53}, "seed", f"between 0 and {MAX_SEED}"),
        ({"seed": -2}, "seed", "-1 (pick one)"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "finite"),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"prompt": "x" * 10_000}, "prompt", "10,000 characters long; the limit on this site is 1,000"),
        ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ],
)
def test_check_inputs_rejects(changes, parameter, fragment):
    params = {"prompt": "a red circle", "width": 128, "height": 128, **changes}
    with pytest.raises(InvalidRequest) as caught:
        check_inputs(demo_preset(), SD, params)
    assert caught.value.parameter == parameter
    assert fragment in caught.value.message


def test_size_multiple_comes_from_family():
    with pytest.raises(InvalidRequest, match="multiple of 16 for this model, got 1000; the nearest valid width is 992"):
        check_inputs(demo_preset(generator={"limits": {"max_size": 1024}}), FAMILIES["flux"], {"prompt": "x", "width": 1000, "height": 512})


def make_source(tmp_path, size=(1366, 768)):
    path = tmp_path / "source.png"
    Image.new("RGB", size, (10, 200, 10)).save(path)
    return str(path)


@pytest.mark.parametrize(
    ("strength", "steps", "fragment"),
    [
        (0.05, 4, "int(4 x 0.05) = 0 denoising steps; raise strength to at least 0.25 or steps to at least 20"),
        (0.8, 1, "int(1 x 0.8) = 0 denoising steps; raise strength to at least 1.00 or steps to at least 2"),
        (0.0, 4, "strength must be above 0"),
    ],
)
def test_strength_times_steps_rejected(tmp_path, strength, steps, fragment):
    params = {"prompt": "x", "width": 128, "height": 128, "init_image": make_source(tmp_path), "strength": strength, "steps": steps}
    with pytest.raises(InvalidRequest) as caught:
        check_inputs(demo_preset(), SD, params)
    assert caught.value.parameter == "strength"
    assert fragment in caught.value.message


def test_init_image_is_fitted_to_request_size(tmp_path):
    params = {"prompt": "x", "width": 128, "height": 64, "init_image": make_source(tmp_path), "strength": 0.5, "steps": 4}
    checked = check_inputs(demo_preset(), SD, params)
    assert checked.init_image.size == (128, 64)


def test_fixed_parameters_reject_other_values():
    preset = demo_preset(generator={"visitor_parameters": ["seed"]})
    with pytest.raises(InvalidRequest, match="steps is fixed at 8"):
        check_inputs(preset, SD, {"prompt": "x", "steps": 9})
    assert check_inputs(preset, SD, {"prompt": "x", "steps": 8}).steps == 8


def test_control_characters_removed():
    checked = check_inputs(demo_preset(), SD, {"prompt": "a\x07 red\u200b circle\x1b"})
    assert checked.prompt == "a red circle"


# -- running on the tiny model ----------------------------------------------------------------


def test_same_seed_gives_identical_pixels(make_services):
    services = make_services(small_preset())
    first = services.generator.generate(request())
    second = services.generator.generate(request())
    assert first.seeds == [1234]
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


def test_different_prompts_differ(make_services):
    services = make_services(small_preset())
    red = services.generator.generate(request(prompt="a red circle"))
    cat = services.generator.generate(request(prompt="a photo of a cat"))
    assert np.abs(pixels(red.images[0]) - pixels(cat.images[0])).mean() > 1.0


def test_each_image_rebuilds_alone(make_services):
    services = make_services(small_preset())
    batch = services.generator.generate(request(num_images=3, seed=10))
    assert batch.seeds == [10, 11, 12]
    alone = services.generator.generate(request(num_images=1, seed=11))
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 2


def test_random_seed_is_recorded(make_services):
    services = make_services(small_preset())
    result = services.generator.generate(request(seed=-1))
    assert 0 <= result.seeds[0] <= MAX_SEED
    again = services.generator.generate(request(seed=result.seeds[0]))
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_image_to_image(make_services, tmp_path):
    services = make_services(small_preset())
    params = {"prompt": "a cat", "width": 64, "height": 64, "init_image": make_source(tmp_path), "strength": 0.5, "steps": 4, "seed": 3}
    checked = check_inputs(services.preset, SD, params)
    result = services.generator.generate(checked)
    assert result.images[0].size == (64, 64)
    assert result.settings["mode"] == "image2image"
    assert result.settings["strength"] == 0.5


def test_results_are_saved_with_settings(make_services):
    services = make_services(small_preset())
    result = services.generator.generate(request(num_images=2, seed=5), owner="browser:x")
    listed = services.gallery.list("browser:x").entries
    assert sorted(e.id for e in listed) == sorted(result.entry_ids)
    assert sorted(e.parameters["seed"] for e in listed) == [5, 6]
    assert all(e.parameters["num_images"] == 1 for e in listed)


def test_long_prompt_is_cut_to_text_window(make_services):
    services = make_services(small_preset())
    long_prompt = " ".join(["red circle"] * 60)
    result = services.generator.generate(request(prompt=long_prompt), owner="browser:x")
    assert "tokens and the model reads 75" in result.notices[0]
    saved = services.gallery.list("browser:x").entries[0].parameters["prompt"]
    assert saved == result.settings["prompt"]
    assert len(saved) < len(long_prompt)


def test_cancel_stops_within_one_step(make_services):
    services = make_services(small_preset())
    job = services.generator.start(request(steps=400, width=128, height=128), owner="browser:x")
    for update in job.progress():
        if update is not None and update.kind == "step" and update.step >= 2:
            break
    job.cancel()
    assert job.finished.wait(30)
    assert isinstance(job.error, JobCancelled)
    assert job.steps_after_cancel <= 1
    assert services.gallery.list("browser:x").total == 0


def test_run_after_interrupt_matches_fresh_run(make_services):
    services = make_services(small_preset())
    job = services.generator.start(request(steps=100, seed=77), owner="browser:x")
    for update in job.progress():
        if update is not None and update.kind == "step" and update.step >= 3:
            break
    job.cancel()
    job.finished.wait(30)
    after = services.generator.generate(request(steps=3, seed=77))
    fresh = make_services(small_preset()).generator.generate(request(steps=3, seed=77))
    assert np.array_equal(pixels(after.images[0]), pixels(fresh.images[0]))


def test_next_job_waits_for_cancelled_one(make_services):
    services = make_services(small_preset())
    first = services.generator.start(request(steps=400, width=128, height=128))
    for update in first.progress():
        if update is not None and update.kind == "step" and update.step >= 1:
            break
    first.cancel()
    second = services.generator.start(request(steps=2))
    second.wait(60)
    assert first.finished.is_set()


def test_black_decode_is_never_a_success(make_services):
    services = make_services(small_preset())
    services.generator.generate(request())  # load
    pipe = services.models.replicas[0].pipelines["text2image"]
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(-5.0)  # every pixel saturates to black
    with pytest.raises(GenerationFailed, match="black"):
        services.generator.generate(request(), owner="browser:x")
    assert services.gallery.list("browser:x").total == 0


def test_half_precision_overflow_is_decoded_again_in_float32(make_services):
    services = make_services(small_preset())
    services.generator.generate(request())
    pipe = services.models.replicas[0].pipelines["text2image"]
    reference = services.generator.generate(request()).images[0]
    pipe.vae.to(torch.bfloat16)

    def overflow_in_half(module, args, output):
        # Stands in for the float16 overflow of SDXL's VAE: infinite values unless in float32.
        return output if output.dtype == torch.float32 else output * float("inf")

    handle = pipe.vae.decoder.register_forward_hook(overflow_in_half)
    try:
        result = services.generator.generate(request())
    finally:
        handle.remove()
        pipe.vae.to(torch.float32)
    assert pipe.vae.dtype == torch.float32
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 2


def test_out_of_memory_is_retried_once(make_services, caplog):
    services = make_services(small_preset())
    services.generator.generate(request())
    pipe = services.models.replicas[0].pipelines["text2image"]
    calls = {"count": 0}

    def fail_first(module, args):
        calls["count"] += 1
        if calls["count"] == 1:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    handle = pipe.unet.register_forward_pre_hook(fail_first)
    try:
        result = services.generator.generate(request(), owner="browser:x")
    finally:
        handle.remove()
    assert len(result.images) == 1
    assert pipe.vae.use_tiling  # the lower-memory retry turned tiling on
    assert "out of memory" in caplog.text


def test_out_of_memory_twice_fails_clearly_and_server_recovers(make_services):
    services = make_services(small_preset())
    services.generator.generate(request())
    pipe = services.models.replicas[0].pipelines["text2image"]

    def always_fail(module, args):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    handle = pipe.unet.register_forward_pre_hook(always_fail)
    try:
        with pytest.raises(GenerationFailed, match="ran out of GPU memory"):
            services.generator.generate(request())
    finally:
        handle.remove()
    assert len(services.generator.generate(request()).images) == 1


def test_concurrent_jobs_never_share_a_replica(make_services):
    services = make_services(small_preset())
    inside = {"now": 0, "max": 0}
    lock = threading.Lock()
    services.generator.generate(request())
    pipe = services.models.replicas[0].pipelines["text2image"]

    def enter(module, args):
        with lock:
            inside["now"] += 1
            inside["max"] = max(inside["max"], inside["now"])
        time.sleep(0.01)
        with lock:
            inside["now"] -= 1

    handle = pipe.unet.register_forward_pre_hook(enter)
    try:
        jobs = [services.generator.start(request(seed=i)) for i in range(4)]
        for job in jobs:
            job.wait(60)
    finally:
        handle.remove()
    assert inside["max"] == 1


def test_cancel_hooks_need_both_ids():
    from kit.cancels import CancelHooks

    hooks = CancelHooks()
    stopped = []
    remove = hooks.register("session-a", "event-1", lambda: stopped.append("event-1"))
    hooks.register("session-a", None, lambda: stopped.append("no event"))
    assert len(hooks) == 1
    assert not hooks.cancel("session-b", "event-1")  # another visitor's session
    assert not hooks.cancel("session-a", "event-2")
    assert hooks.cancel("session-a", "event-1")
    assert stopped == ["event-1"]
    assert not hooks.cancel("session-a", "event-1")  # a hook runs once
    remove()  # removing after it ran is harmless
    assert len(hooks) == 0


def test_cancel_session_runs_its_hooks_only():
    from kit.cancels import CancelHooks

    hooks = CancelHooks()
    ran: list[str] = []
    hooks.register("session-a", "event-1", lambda: ran.append("a1"))
    hooks.register("session-a", "event-2", lambda: ran.append("a2"))
    hooks.register("session-b", "event-1", lambda: ran.append("b1"))
    assert hooks.cancel_session("session-a") == 2
    assert sorted(ran) == ["a1", "a2"]
    assert hooks.cancel_session("session-a") == 0
    assert len(hooks) == 1  # the other visitor's job keeps its hook
