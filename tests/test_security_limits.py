"""Job limits per identity, the prompt blocklist, and property tests of the /generate checks."""

from __future__ import annotations

import time

import pytest
from gradio_client.exceptions import ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kit.errors import InvalidRequest
from kit.families import FAMILIES
from kit.generate import MAX_SEED, check_inputs
from kit.security.auth import API_TOKENS_ENV, hash_api_token
from kit.security.limits import JobLimiter, SlidingWindow, TermBlocklist, identity_for
from tests.conftest import demo_preset
from tests.test_security_auth import site_preset


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for_status(job, names, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.status().code.name in names:
            return
        time.sleep(0.05)
    raise AssertionError(f"job never reached {names}; last status {job.status().code.name}")


def test_per_minute_limit_says_when_to_retry():
    clock = FakeClock()
    limiter = JobLimiter(jobs_per_minute=10, max_queued=0, clock=clock)
    for _ in range(10):
        limiter.admit("address:1.2.3.4", queued=0)
        clock.now += 3.7
    # The first job was 37 s ago, so a slot frees in 23 s.
    with pytest.raises(InvalidRequest) as caught:
        limiter.admit("address:1.2.3.4", queued=0)
    assert caught.value.message == "Too many jobs: 10 per minute on this site. Try again in 23 s."
    limiter.admit("address:5.6.7.8", queued=0)  # another identity has its own count
    clock.now += 23.0
    limiter.admit("address:1.2.3.4", queued=0)


def test_rejected_jobs_do_not_count():
    clock = FakeClock()
    limiter = JobLimiter(jobs_per_minute=1, max_queued=0, clock=clock)
    limiter.admit("user:alice", queued=0)
    for _ in range(5):
        with pytest.raises(InvalidRequest):
            limiter.admit("user:alice", queued=0)
    clock.now += 60.0
    limiter.admit("user:alice", queued=0)


def test_queued_limit():
    limiter = JobLimiter(jobs_per_minute=0, max_queued=2)
    limiter.admit("user:alice", queued=1)
    with pytest.raises(InvalidRequest, match="Too many jobs at once: 2 queued or running"):
        limiter.admit("user:alice", queued=2)


def test_limits_off_at_zero():
    limiter = JobLimiter(jobs_per_minute=0, max_queued=0)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.admit("address:1.2.3.4", queued=500)


def test_window_forgets_idle_identities():
    clock = FakeClock()
    window = SlidingWindow(1, clock=clock)
    for index in range(3000):
        window.record(f"address:{index}")
        clock.now += 0.1
    # At 10 identities a second, 600 are inside the window; a sweep runs every 1024 events.
    assert len(window._events) <= 600 + 1024


def test_identity_prefers_user():
    assert identity_for("alice", "1.2.3.4") == "user:alice"
    assert identity_for(None, "1.2.3.4") == "address:1.2.3.4"
    assert identity_for("", None) == "address:unknown"


@pytest.mark.parametrize(
    ("prompt", "blocked"),
    [
        ("a forbidden fruit", True),
        ("A FORBIDDEN   Fruit!", True),
        ("forbidden\nfruit", True),
        ("ｆｏｒｂｉｄｄｅｎ fruit", True),  # fullwidth letters fold to ASCII
        ("forbidden fruitcake", False),
        ("a forbidden apple", False),
        ("spam", True),
        ("Spam, eggs", True),
        ("spammer", False),
        ("antispam", False),
        ("", False),
    ],
)
def test_blocklist_whole_words_any_case(prompt, blocked):
    blocklist = TermBlocklist(["forbidden fruit", "Spam"])
    assert blocklist.matches(prompt) is blocked


def test_blocklist_message_is_neutral():
    blocklist = TermBlocklist(["spam"])
    with pytest.raises(InvalidRequest) as caught:
        blocklist.check("spam please")
    assert "spam" not in caught.value.message.lower()
    assert not TermBlocklist([]).enabled


def test_blocked_prompt_rejected_before_queue(launch_site):
    site = launch_site(site_preset(blocked_terms=["forbidden fruit"]))
    client = site.client()
    with pytest.raises(ValidationError, match="not allowed on this site"):
        client.predict(prompt="A Forbidden  fruit bowl", api_name="/generate")
    assert not site.services.models.is_loaded()
    _, record, _ = client.predict(prompt="a forbidden apple", seed=1, api_name="/generate")
    assert record["seeds"] == [1]


def test_jobs_per_minute_through_api(launch_site, tmp_path):
    site = launch_site(site_preset(jobs_per_minute=2))
    client = site.client()
    client.predict(prompt="one", seed=1, api_name="/generate")
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "yellow").save(source)
    from gradio_client import handle_file

    client.predict(image=handle_file(str(source)), api_name="/describe")  # describe jobs count too
    with pytest.raises(ValidationError, match=r"Too many jobs: 2 per minute on this site\. Try again in \d+ s\."):
        client.predict(prompt="three", seed=3, api_name="/generate")
    with pytest.raises(ValidationError, match="Too many jobs: 2 per minute"):
        client.predict(image=handle_file(str(source)), api_name="/describe")


def test_limits_are_per_user(launch_site, monkeypatch):
    monkeypatch.setenv(API_TOKENS_ENV, f"ann:{hash_api_token('kit_ann')},ben:{hash_api_token('kit_ben')}")
    site = launch_site(site_preset(jobs_per_minute=1))
    ann = site.client(headers={"Authorization": "Bearer kit_ann"})
    ben = site.client(headers={"Authorization": "Bearer kit_ben"})
    ann.predict(prompt="first", seed=1, api_name="/generate")
    with pytest.raises(ValidationError, match="Too many jobs"):
        ann.predict(prompt="second", seed=2, api_name="/generate")
    _, record, _ = ben.predict(prompt="ben's", seed=3, api_name="/generate")
    assert record["seeds"] == [3]


def test_queued_jobs_per_identity_through_api(launch_site):
    preset = site_preset(max_queued_per_identity=1)
    preset = preset.model_copy(
        update={"generator": preset.generator.model_copy(update={"limits": preset.generator.limits.model_copy(update={"max_steps": 500})})}
    )
    site = launch_site(preset)
    first_client, second_client = site.client(), site.client()
    long_job = first_client.submit(prompt="a slow one", steps=500, api_name="/generate")
    wait_for_status(long_job, {"PROCESSING", "PROGRESS"})
    try:
        with pytest.raises(ValidationError, match="Too many jobs at once: 1 queued or running"):
            second_client.predict(prompt="another", steps=1, api_name="/generate")
    finally:
        long_job.cancel()
    wait_for_status(long_job, {"CANCELLED", "FINISHED"})
    deadline = time.monotonic() + 30
    while True:  # Gradio drops the event from its queue shortly after the cancel
        try:
            _, record, _ = second_client.predict(prompt="after", seed=5, steps=1, api_name="/generate")
            break
        except ValidationError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert record["seeds"] == [5]


# -- property tests of /generate's checks ------------------------------------------------------

PRESET = demo_preset(
    generator={
        "model": "builtin:tiny-sd",
        "visitor_parameters": ["negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images", "init_image", "strength"],
        "defaults": {"steps": 8, "width": 128, "height": 128},
        "limits": {"min_size": 64, "max_size": 512, "max_steps": 200, "max_prompt_chars": 300},
    }
)
FAMILY = FAMILIES["sd"]
PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=400),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
PARAMETERS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images", "strength")


@PROPERTIES
@given(params=st.fixed_dictionaries({}, optional={name: ANY_VALUE for name in PARAMETERS}))
def test_check_inputs_raises_only_invalid_request(params):
    try:
        request = check_inputs(PRESET, FAMILY, params)
    except InvalidRequest as exc:
        assert exc.message
        return
    assert request.prompt
    assert "\x00" not in request.prompt


@PROPERTIES
@given(
    prompt=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn", "Zs")), min_size=1, max_size=300),
    seed=st.integers(min_value=-1, max_value=MAX_SEED),
    steps=st.integers(min_value=1, max_value=200),
    guidance_scale=st.floats(min_value=0.0, max_value=20.0),
    width=st.integers(min_value=8, max_value=64).map(lambda n: n * 8),
    height=st.integers(min_value=8, max_value=64).map(lambda n: n * 8),
    num_images=st.integers(min_value=1, max_value=4),
    as_text=st.booleans(),
)
def test_valid_inputs_round_trip(prompt, seed, steps, guidance_scale, width, height, num_images, as_text):
    params = {"prompt": prompt, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "width": width, "height": height, "num_images": num_images}
    if as_text:  # API callers may send numbers as strings or floats
        params = {**params, "seed": str(seed), "steps": float(steps)}
    if width * height > PRESET.generator.limits.max_pixels:
        with pytest.raises(InvalidRequest, match="width x height"):
            check_inputs(PRESET, FAMILY, params)
        return
    request = check_inputs(PRESET, FAMILY, params)
    assert request.prompt == prompt
    assert (request.seed, request.steps, request.num_images) == (seed, steps, num_images)
    assert (request.width, request.height) == (width, height)
    assert request.guidance_scale == guidance_scale
    assert request.init_image is None
