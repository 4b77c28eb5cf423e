"""The microsite end to end: a real Gradio server in this process, driven by gradio_client."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import OUTSIDE_CONNECTIONS, demo_preset

LONG_JOB = {"prompt": "a slow one", "steps": 500, "width": 128, "height": 128}


def fast_preset(**sections):
    return demo_preset(generator={"limits": {"min_size": 64, "max_steps": 500}}, **sections)


def result_pixels(item) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB")).astype(np.int16)


def wait_for_status(job, names, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.status().code.name in names:
            return
        time.sleep(0.05)
    raise AssertionError(f"job never reached {names}; last status {job.status().code.name}")


def count_unet_calls(site):
    """Record the time of every UNet call on the site's replica (one call per denoising step)."""
    calls: list[float] = []
    replica = site.services.models.replicas[0]

    def record(module, args):
        calls.append(time.monotonic())

    handle = replica.pipelines["text2image"].unet.register_forward_pre_hook(record)
    return calls, handle


def test_generate_by_keyword(launch_site):
    site = launch_site(fast_preset())
    client = site.client()
    images, record, status = client.predict(prompt="a red circle", seed=42, steps=3, width=64, height=64, api_name="/generate")
    assert len(images) == 1
    assert record["seeds"] == [42]
    assert record["model"] == "builtin:tiny-sd"
    assert record["settings"]["steps"] == 3
    assert len(record["entry_ids"]) == 1
    assert "Seed: 42" in status


def test_same_seed_same_pixels_through_api(launch_site):
    client = launch_site(fast_preset()).client()
    first = client.predict(prompt="a red circle", seed=7, steps=3, width=64, height=64, api_name="/generate")[0][0]
    second = client.predict(prompt="a red circle", seed=7, steps=3, width=64, height=64, api_name="/generate")[0][0]
    other = client.predict(prompt="a blue square", seed=7, steps=3, width=64, height=64, api_name="/generate")[0][0]
    assert np.array_equal(result_pixels(first), result_pixels(second))
    assert np.abs(result_pixels(first) - result_pixels(other)).mean() > 1.0


def test_image_to_image_through_api(launch_site, tmp_path):
    client = launch_site(fast_preset()).client()
    source = tmp_path / "source.png"
    Image.new("RGB", (1366, 768), (0, 0, 255)).save(source)
    images, record, _ = client.predict(
        prompt="a cat", init_image=handle_file(str(source)), strength=0.5, steps=4, width=128, height=64, api_name="/generate"
    )
    assert record["settings"]["mode"] == "image2image"
    assert Image.open(images[0]["image"]).size == (128, 64)


def test_describe_then_use_as_prompt(launch_site, tmp_path):
    client = launch_site(fast_preset()).client()
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (255, 255, 0)).save(source)
    caption = client.predict(image=handle_file(str(source)), api_name="/describe")
    assert isinstance(caption, str) and caption
    _, record, _ = client.predict(prompt=caption, seed=1, steps=2, width=64, height=64, api_name="/generate")
    assert record["settings"]["prompt"] == caption


def test_bad_values_rejected_before_queue(launch_site, tmp_path):
    site = launch_site(fast_preset())
    client = site.client()
    with pytest.raises(Exception, match="multiple of 8 for this model, got 427; the nearest valid width is 424"):
        client.predict(prompt="x", width=427, api_name="/generate")
    source = tmp_path / "s.png"
    Image.new("RGB", (64, 64)).save(source)
    with pytest.raises(Exception, match=r"int\(4 x 0.05\) = 0"):
        client.predict(prompt="x", init_image=handle_file(str(source)), strength=0.05, steps=4, api_name="/generate")
    assert not site.services.models.is_loaded()  # nothing reached a model


def test_unknown_parameter_is_rejected(launch_site):
    client = launch_site(fast_preset()).client()
    with pytest.raises(TypeError, match="colour"):
        client.predict(prompt="x", colour="red", api_name="/generate")


def test_gallery_lists_callers_entries(launch_site):
    site = launch_site(fast_preset())
    alice, bob = site.client(), site.client()
    alice.predict(prompt="first", seed=1, steps=2, width=64, height=64, api_name="/generate")
    alice.predict(prompt="second", seed=2, steps=2, width=64, height=64, num_images=2, api_name="/generate")
    bob.predict(prompt="bob's", seed=3, steps=2, width=64, height=64, api_name="/generate")
    listing = alice.predict(page=1, page_size=2, api_name="/gallery")
    assert listing["total"] == 3
    assert listing["pages"] == 2
    assert [e["prompt"] for e in listing["entries"]] == ["second", "second"]
    assert {e["seed"] for e in listing["entries"]} == {2, 3}
    assert bob.predict(api_name="/gallery")["total"] == 1
    with urllib.request.urlopen(site.url.rstrip("/") + listing["entries"][0]["image"]) as response:
        assert response.status == 200
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_shared_gallery_shows_everyone(launch_site):
    site = launch_site(fast_preset(gallery={"scope": "shared"}))
    site.client().predict(prompt="one", steps=2, width=64, height=64, api_name="/generate")
    site.client().predict(prompt="two", steps=2, width=64, height=64, api_name="/generate")
    assert site.client().predict(api_name="/gallery")["total"] == 2


@pytest.mark.parametrize("status_interval", [None, 3600.0], ids=["default", "no-yields-while-denoising"])
def test_cancel_stops_within_one_step(launch_site, monkeypatch, status_interval):
    if status_interval is not None:
        # With no yield during denoising, Gradio cannot close the handler in time: only the
        # cancel hook that the middleware runs can stop the job within a step.
        monkeypatch.setattr("kit.ui.generator.STATUS_INTERVAL_SECONDS", status_interval)
        monkeypatch.setattr("kit.generate.PREVIEW_INTERVAL_SECONDS", status_interval)
        monkeypatch.setattr("kit.ui.generator.KEEPALIVE_SECONDS", status_interval)
    site = launch_site(fast_preset())
    hooks_run = []
    original_cancel = site.services.cancel_hooks.cancel
    monkeypatch.setattr(
        site.services.cancel_hooks, "cancel", lambda *ids: hooks_run.append(original_cancel(*ids)) or hooks_run[-1]
    )
    client = site.client()
    client.predict(prompt="load", steps=1, width=64, height=64, api_name="/generate")  # load the model
    calls, handle = count_unet_calls(site)
    try:
        job = client.submit(api_name="/generate", **LONG_JOB)
        deadline = time.monotonic() + 60
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled_at = time.monotonic()
        job.cancel()
        wait_for_status(job, {"CANCELLED"})
        replica = site.services.models.replicas[0]
        while replica.busy and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        handle.remove()
    after_cancel = [t for t in calls if t > cancelled_at]
    assert len(calls) < LONG_JOB["steps"]
    assert len(after_cancel) <= 1
    assert hooks_run == [True]
    assert len(site.services.cancel_hooks) == 0
    assert client.predict(api_name="/gallery")["total"] == 1  # only the loading job's image


def test_full_queue_gives_readable_error(launch_site):
    site = launch_site(fast_preset(queue={"max_size": 2, "max_batch_size": 1}))
    # Gradio hands the kit model_concurrency jobs; max_size more wait in Gradio's queue.
    admitted = site.services.model_concurrency + 2
    clients = [site.client() for _ in range(admitted + 1)]
    jobs = []
    for client in clients[:admitted]:
        jobs.append(client.submit(api_name="/generate", **LONG_JOB))
        wait_for_status(jobs[-1], {"PROCESSING", "ITERATING", "IN_QUEUE"})
    extra = clients[admitted].submit(api_name="/generate", **LONG_JOB)
    with pytest.raises(Exception, match="Queue is full"):
        extra.result(timeout=30)
    for job in jobs:
        job.cancel()
    for job in jobs:
        wait_for_status(job, {"CANCELLED", "FINISHED"})
    # The queue drains: a new job runs to the end.
    result = site.client().predict(prompt="after", steps=2, width=64, height=64, api_name="/generate")
    assert len(result[0]) == 1


def test_running_jobs_match_configured_concurrency(launch_site):
    site = launch_site(fast_preset(queue={"concurrency_per_replica": 1, "max_batch_size": 1}))
    site.client().predict(prompt="load", steps=1, width=64, height=64, api_name="/generate")
    replica = site.services.models.replicas[0]
    unet = replica.pipelines["text2image"].unet
    state = {"inside": 0, "max": 0}

    def enter(module, args):
        state["inside"] += 1
        state["max"] = max(state["max"], state["inside"])

    def leave(module, args, output):
        state["inside"] -= 1

    handles = [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave)]
    try:
        jobs = [site.client().submit(prompt=f"p{i}", steps=3, width=64, height=64, api_name="/generate") for i in range(3)]
        for job in jobs:
            job.result(timeout=120)
    finally:
        for handle in handles:
            handle.remove()
    assert state["max"] == 1


def test_gallery_survives_restart(launch_site, data_dir):
    first = launch_site(fast_preset(gallery={"scope": "shared"}))
    seeds = []
    for i in range(3):
        _, record, _ = first.client().predict(prompt=f"image {i}", seed=100 + i, steps=2, width=64, height=64, api_name="/generate")
        seeds.append(record["seeds"][0])
    original = first.client().predict(api_name="/gallery")
    first.demo.close()
    first.services.close()

    second = launch_site(fast_preset(gallery={"scope": "shared"}), folder=data_dir)
    listing = second.client().predict(api_name="/gallery")
    assert listing["total"] == 3
    assert sorted(e["seed"] for e in listing["entries"]) == sorted(seeds)
    assert [e["id"] for e in listing["entries"]] == [e["id"] for e in original["entries"]]
    # Each entry rebuilds from its recorded settings.
    entry = listing["entries"][0]
    settings = entry["settings"]
    rebuilt, _, _ = second.client().predict(
        prompt=settings["prompt"], seed=settings["seed"], steps=settings["steps"], width=settings["width"],
        height=settings["height"], guidance_scale=settings["guidance_scale"], api_name="/generate",
    )
    with urllib.request.urlopen(second.url.rstrip("/") + entry["image"]) as response:
        saved = np.asarray(Image.open(response).convert("RGB")).astype(np.int16)
    assert np.array_equal(saved, result_pixels(rebuilt[0]))


def test_errors_reach_client_as_messages(launch_site):
    client = launch_site(fast_preset()).client()
    with pytest.raises((AppError, Exception), match="prompt is empty"):
        client.predict(prompt="   ", api_name="/generate")


def test_no_outside_host_contacted():
    # Runs after the server tests in this module; the socket guard in conftest records attempts.
    assert OUTSIDE_CONNECTIONS == []


def test_api_callers_get_no_previews(launch_site, monkeypatch):
    monkeypatch.setattr("kit.generate.PREVIEW_INTERVAL_SECONDS", 0.0)  # a preview at every step
    site = launch_site(fast_preset())
    job = site.client().submit(prompt="watched", steps=12, width=128, height=128, api_name="/generate")
    images, record, status = job.result(timeout=120)
    assert len(images) == 1
    intermediate = job.outputs()[:-1]
    assert intermediate, "the handler sent no status updates"
    # Status updates for API callers carry an empty gallery, where a preview would be a gallery item.
    assert not [output for output in intermediate if output[0]], "an API caller was sent preview images"
    assert all(isinstance(output[2], str) and output[2] for output in intermediate)  # a status line each


@pytest.mark.parametrize(("body", "status"), [(b"not json", 422), (b"{" + b" " * 20_000 + b"}", 413)])
def test_cancel_route_rejects_bad_bodies(launch_site, body, status):
    import urllib.error

    site = launch_site(fast_preset())
    request = urllib.request.Request(
        site.url.rstrip("/") + "/gradio_api/cancel", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    assert failure.value.code == status
    # The site still serves jobs afterwards.
    images, _, _ = site.client().predict(prompt="after", steps=2, width=64, height=64, api_name="/generate")
    assert len(images) == 1
