"""Dynamic batching: compatible jobs share one pipeline call and keep their own results."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kit.errors import JobCancelled
from kit.generate import GenerationRequest
from tests.conftest import demo_preset


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a red circle", seed=1, steps=4, guidance_scale=5.0, width=64, height=64, num_images=1)
    values.update(changes)
    return GenerationRequest(**values)


def batching_preset(max_batch_size=4):
    return demo_preset(generator={"limits": {"min_size": 64, "max_steps": 500}}, queue={"max_batch_size": max_batch_size})


def record_batch_sizes(services):
    """Record the UNet's batch dimension per call; with guidance each image counts twice."""
    sizes: list[int] = []
    unet = services.models.replicas[0].pipelines["text2image"].unet
    handle = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def hold_replica(services):
    """Start a long job so that the next jobs queue up behind it; return it once it is running."""
    blocker = services.generator.start(request(prompt="blocker", steps=500, width=128, height=128), save=False)
    for update in blocker.progress():
        if update is not None and update.kind == "step" and update.step >= 1:
            return blocker
    raise AssertionError("the blocking job never started")


def test_batched_jobs_match_solo_runs(make_services):
    services = make_services(batching_preset())
    services.generator.generate(request())  # load
    solo_requests = [
        request(prompt="a red circle", seed=11),
        request(prompt="a blue square", seed=22, num_images=2),
        request(prompt="a green star", seed=33, negative_prompt="blurry"),
    ]
    solo = [services.generator.generate(r) for r in solo_requests]

    blocker = hold_replica(services)
    jobs = [services.generator.start(r, owner="browser:b") for r in solo_requests]
    time.sleep(0.2)
    sizes, handle = record_batch_sizes(services)
    blocker.cancel()
    try:
        results = [job.wait(120) for job in jobs]
    finally:
        handle.remove()

    assert 8 in sizes  # 4 images in one call, doubled for classifier-free guidance
    for alone, batched in zip(solo, results):
        assert batched.seeds == alone.seeds
        assert len(batched.images) == len(alone.images)
        for a, b in zip(alone.images, batched.images):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2
    assert services.gallery.list("browser:b").total == 4


def test_cancel_inside_batch_removes_only_that_job(make_services):
    services = make_services(batching_preset())
    services.generator.generate(request())
    expected = services.generator.generate(request(prompt="kept", seed=5, steps=60))

    blocker = hold_replica(services)
    kept = services.generator.start(request(prompt="kept", seed=5, steps=60), owner="browser:k")
    dropped = services.generator.start(request(prompt="dropped", seed=6, steps=60), owner="browser:d")
    time.sleep(0.2)
    blocker.cancel()
    for update in dropped.progress():
        if update is not None and update.kind == "step" and update.step >= 2:
            break
    dropped.cancel()
    result = kept.wait(120)
    dropped.finished.wait(120)

    assert isinstance(dropped.error, JobCancelled)
    assert services.gallery.list("browser:d").total == 0
    assert services.gallery.list("browser:k").total == 1
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 2


def test_batch_stops_when_every_job_cancels(make_services):
    services = make_services(batching_preset())
    services.generator.generate(request())
    blocker = hold_replica(services)
    jobs = [services.generator.start(request(prompt=f"p{i}", steps=400, width=128, height=128)) for i in range(3)]
    time.sleep(0.2)
    blocker.cancel()
    for update in jobs[0].progress():
        if update is not None and update.kind == "step" and update.step >= 2:
            break
    for job in jobs:
        job.cancel()
    for job in jobs:
        assert job.finished.wait(60)
        assert isinstance(job.error, JobCancelled)
    assert max(job.steps_after_cancel for job in jobs) <= 1


def test_incompatible_jobs_run_apart(make_services):
    services = make_services(batching_preset())
    services.generator.generate(request())
    blocker = hold_replica(services)
    jobs = [
        services.generator.start(request(width=64)),
        services.generator.start(request(width=128)),
        services.generator.start(request(steps=3)),
    ]
    time.sleep(0.2)
    sizes, handle = record_batch_sizes(services)
    blocker.cancel()
    try:
        for job in jobs:
            job.wait(120)
    finally:
        handle.remove()
    assert max(sizes) == 2  # one image per call, doubled for guidance


def test_batch_size_one_turns_batching_off(make_services):
    services = make_services(batching_preset(max_batch_size=1))
    services.generator.generate(request())
    blocker = hold_replica(services)
    jobs = [services.generator.start(request(seed=i)) for i in range(3)]
    time.sleep(0.2)
    sizes, handle = record_batch_sizes(services)
    blocker.cancel()
    try:
        for job in jobs:
            job.wait(120)
    finally:
        handle.remove()
    assert max(sizes) == 2


def test_cancel_while_waiting_never_runs(make_services):
    services = make_services(batching_preset())
    services.generator.generate(request())
    blocker = hold_replica(services)
    waiting = services.generator.start(request(seed=9), owner="browser:w")
    waiting.cancel()
    assert waiting.finished.wait(10)  # ends while the blocker still holds the replica
    assert not blocker.finished.is_set()
    blocker.cancel()
    with pytest.raises(JobCancelled):
        waiting.wait(60)
    assert services.gallery.list("browser:w").total == 0


def test_site_lets_in_a_batch_of_jobs(launch_site):
    site = launch_site(batching_preset())
    assert site.services.model_concurrency == 8  # a batch of 4 running and the next 4 waiting
    client = site.client()
    client.predict(prompt="load", steps=1, width=64, height=64, api_name="/generate")
    sizes, handle = record_batch_sizes(site.services)
    try:
        blocker = site.client().submit(prompt="blocker", steps=300, width=128, height=128, api_name="/generate")
        while not sizes:
            time.sleep(0.02)
        jobs = [site.client().submit(prompt=f"visitor {i}", seed=i, steps=3, width=64, height=64, api_name="/generate") for i in range(3)]
        time.sleep(1.0)
        blocker.cancel()
        records = [job.result(timeout=120)[1] for job in jobs]
    finally:
        handle.remove()
    assert [r["seeds"] for r in records] == [[0], [1], [2]]
    assert 6 in sizes  # the three visitors' jobs ran as one call


def submitter(collector):
    """Return a function that submits a job with the given prompt to ``collector``."""
    from kit.generate import GenerationJob

    def submit(prompt):
        job = GenerationJob(request(prompt=prompt), owner="test")
        collector.submit(job)
        return job

    return submit


def test_auto_window_gathers_jobs_only_when_busy():
    import threading

    from kit.batching import AUTO_WINDOW_MAX, BatchCollector

    batches: list[list[str]] = []
    release_first = threading.Event()

    def run_batch(jobs):
        batches.append([job.request.prompt for job in jobs])
        if jobs[0].request.prompt == "first":
            release_first.wait(10)
        time.sleep(0.4)
        for job in jobs:
            job.finished.set()

    collector = BatchCollector(run_batch, slots=1, max_batch_size=4, max_images=8, window_seconds=None)
    submit = submitter(collector)

    # Quiet site: a lone job starts at once.
    first = submit("first")
    deadline = time.monotonic() + 5
    while not batches and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batches == [["first"]]
    assert collector.current_window() == 0.0

    # Jobs that queued behind it share the next call.
    queued = [submit(f"queued {i}") for i in range(3)]
    release_first.set()
    for job in [first, *queued]:
        assert job.finished.wait(10)
    assert batches[1] == ["queued 0", "queued 1", "queued 2"]
    window = collector.current_window()
    assert 0.1 < window <= AUTO_WINDOW_MAX

    # Busy site: a job that arrives first waits for the ones close behind it.
    early = submit("early")
    time.sleep(window / 3)
    late = submit("late")
    assert early.finished.wait(10)
    assert late.finished.wait(10)
    assert batches[2] == ["early", "late"]

    # A fixed window of 0 never waits.
    collector.window_seconds = 0.0
    assert collector.current_window() == 0.0
    collector.close()


def test_burst_on_quiet_site_shares_call(monkeypatch):
    from kit.batching import BatchCollector

    # Generous gaps, so that a slow machine still counts the third job as part of the burst.
    monkeypatch.setattr("kit.batching.ARRIVAL_GAP_SECONDS", 0.5)
    monkeypatch.setattr("kit.batching.BURST_WAIT_MAX", 2.0)
    batches: list[list[str]] = []

    def run_batch(jobs):
        batches.append([job.request.prompt for job in jobs])
        for job in jobs:
            job.finished.set()

    collector = BatchCollector(run_batch, slots=1, max_batch_size=4, max_images=8, window_seconds=None)
    submit = submitter(collector)

    # Two jobs land together on an idle collector, a third one shortly after.
    with collector._condition:
        jobs = [submit("a"), submit("b")]
    time.sleep(0.05)
    jobs.append(submit("c"))
    for job in jobs:
        assert job.finished.wait(10)
    assert batches == [["a", "b", "c"]]

    # A lone job on a quiet site starts at once, with no wait for company.
    started = time.monotonic()
    alone = submit("alone")
    assert alone.finished.wait(10)
    assert time.monotonic() - started < 0.4
    assert batches[-1] == ["alone"]
    collector.close()
