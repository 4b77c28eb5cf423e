"""Text-to-image and image-to-image jobs: check the request, run it, stop it on cancel.

The Gradio event handler calls ``check_inputs`` before the job is queued, then ``start``.
The pipeline runs in a worker thread that has taken a model replica. The handler reads
progress from the returned ``GenerationJob`` and calls ``cancel()`` when its visitor leaves.
``callback_on_step_end`` turns the cancel flag into ``pipe._interrupt``, so a cancelled run
stops within one denoising step and saves nothing.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import __version__
from kit.errors import GenerationFailed, InvalidRequest, JobCancelled, KitError
from kit.batching import AllCancelled, BatchCollector
from kit.families import ModelFamily, snap_to_multiple
from kit.images import fit_to_size, open_image
from kit.models import IMAGE2IMAGE, TEXT2IMAGE, ModelManager, Replica
from kit.presets import Preset

logger = logging.getLogger(__name__)

MAX_SEED = 2**53 - 1  # browsers keep integers exact up to here
# Families whose pipelines take a list of prompts with one torch.Generator per image and give
# each image the pixels it would get alone. Others run one job per call.
BATCH_SAFE_FAMILIES = ("sd", "sd2", "sdxl")
# A decoded image whose brightest channel stays below this (out of 255) counts as black.
BLACK_IMAGE_MAX = 3
# Live previews while denoising: at most one per this many seconds, per pipeline call.
PREVIEW_INTERVAL_SECONDS = 0.25
# Step updates per job: at most one per this many seconds, besides the first and last step and
# those that carry a preview. Each update wakes the job's handler thread and sends a message.
# With a fast model, one update per step takes the interpreter lock from the denoising loop
# often enough to slow it: the demo model's 25 steps took 0.45 s in the server instead of
# 0.35 s on a 2-core CPU.
PROGRESS_INTERVAL_SECONDS = 0.25


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 25
    guidance_scale: float = 7.0
    width: int = 512
    height: int = 512
    num_images: int = 1
    init_image: Any = None  # PIL image, already opened and checked, or None
    strength: float = 0.6

    @property
    def mode(self) -> str:
        return IMAGE2IMAGE if self.init_image is not None else TEXT2IMAGE


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images
    seeds: list[int]
    settings: dict[str, Any]
    model: str
    notices: list[str] = field(default_factory=list)
    entry_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "settings": self.settings,
            "model": self.model,
            "entry_ids": self.entry_ids,
            "notices": self.notices,
            "seconds": round(self.seconds, 3),
        }


def _as_int(parameter: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(parameter, f"{parameter} must be a whole number, got {value!r}.")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidRequest(parameter, f"{parameter} must be a whole number, got {value!r}.")


def _as_float(parameter: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(parameter, f"{parameter} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(parameter, f"{parameter} must be a number, got {value!r}.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InvalidRequest(parameter, f"{parameter} must be a finite number, got {value!r}.")
    return number


def _clean_text(parameter: str, value: Any, max_chars: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(parameter, f"{parameter} must be text, got {type(value).__name__}.")
    if "\x00" in value:
        raise InvalidRequest(parameter, f"{parameter} contains a NUL character; remove it and try again.")
    cleaned = "".join(ch for ch in value if ch in "\n\t" or ch.isprintable()).strip()
    if len(cleaned) > max_chars:
        raise InvalidRequest(
            parameter, f"{parameter} is {len(cleaned):,} characters long; the limit on this site is {max_chars:,}."
        )
    return cleaned


def check_inputs(preset: Preset, family: ModelFamily, params: dict[str, Any]) -> GenerationRequest:
    """Turn raw endpoint values into a ``GenerationRequest`` or raise ``InvalidRequest``.

    Every rule comes from the preset and the model family, and every message names the
    value and the allowed range. This runs before the job enters the queue.
    """
    settings = preset.generator
    d, lim = settings.defaults, settings.limits
    allowed = set(settings.visitor_parameters)

    prompt = _clean_text("prompt", params.get("prompt"), lim.max_prompt_chars)
    if not prompt:
        raise InvalidRequest("prompt", "prompt is empty; describe the image you want.")
    negative_prompt = _clean_text("negative_prompt", params.get("negative_prompt"), lim.max_prompt_chars)

    seed = _as_int("seed", params.get("seed", -1))
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest("seed", f"seed must be -1 (pick one) or between 0 and {MAX_SEED}, got {seed}.")

    steps = _as_int("steps", params.get("steps", d.steps))
    if not lim.min_steps <= steps <= lim.max_steps:
        raise InvalidRequest("steps", f"steps must be between {lim.min_steps} and {lim.max_steps}, got {steps}.")

    guidance_scale = _as_float("guidance_scale", params.get("guidance_scale", d.guidance_scale))
    if not 0.0 <= guidance_scale <= lim.max_guidance_scale:
        raise InvalidRequest(
            "guidance_scale",
            f"guidance_scale must be between 0 and {lim.max_guidance_scale:g}, got {guidance_scale:g}.",
        )

    width = _as_int("width", params.get("width", d.width))
    height = _as_int("height", params.get("height", d.height))
    for name, value in (("width", width), ("height", height)):
        if not lim.min_size <= value <= lim.max_size:
            raise InvalidRequest(name, f"{name} must be between {lim.min_size} and {lim.max_size} pixels, got {value}.")
        if value % family.size_multiple:
            nearest = min(max(snap_to_multiple(value, family.size_multiple), lim.min_size), lim.max_size)
            raise InvalidRequest(
                name,
                f"{name} must be a multiple of {family.size_multiple} for this model, got {value}; "
                f"the nearest valid {name} is {nearest}.",
            )
    if width * height > lim.max_pixels:
        raise InvalidRequest(
            "width", f"width x height is {width * height:,} pixels; the limit on this site is {lim.max_pixels:,}."
        )

    num_images = _as_int("num_images", params.get("num_images", d.num_images))
    if not 1 <= num_images <= lim.max_num_images:
        raise InvalidRequest(
            "num_images", f"num_images must be between 1 and {lim.max_num_images}, got {num_images}."
        )

    strength = _as_float("strength", params.get("strength", d.strength))
    init_image = None
    source = params.get("init_image")
    if source:
        if not 0.0 < strength <= 1.0:
            raise InvalidRequest("strength", f"strength must be above 0 and at most 1, got {strength:g}.")
        effective = int(steps * strength)
        if effective < 1:
            min_steps = math.ceil(1 / strength - 1e-9)
            raise InvalidRequest(
                "strength",
                f"strength {strength:g} with {steps} steps runs int({steps} x {strength:g}) = {effective} "
                f"denoising steps; raise strength to at least {1 / steps:.2f} or steps to at least {min_steps}.",
            )
        image = open_image(_source_path(source), "init_image", preset.security.max_input_pixels)
        init_image = fit_to_size(image, width, height)

    values = {
        "negative_prompt": (negative_prompt, d.negative_prompt),
        "steps": (steps, d.steps),
        "guidance_scale": (guidance_scale, d.guidance_scale),
        "width": (width, d.width),
        "height": (height, d.height),
        "num_images": (num_images, d.num_images),
        "strength": (strength, d.strength),
    }
    for name, (value, default) in values.items():
        if name not in allowed and value != default:
            raise InvalidRequest(name, f"{name} is fixed at {default!r} on this site; leave it out.")
    if "init_image" not in allowed and init_image is not None:
        raise InvalidRequest("init_image", "image-to-image is turned off on this site.")
    if "seed" not in allowed and seed != -1:
        raise InvalidRequest("seed", "seed cannot be chosen on this site; leave it at -1.")

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        num_images=num_images,
        init_image=init_image,
        strength=strength,
    )


def _source_path(source: Any) -> str:
    """Accept what Gradio and gradio_client pass for an image: a path or a FileData mapping."""
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    raise InvalidRequest("init_image", "init_image must be an uploaded image file.")


def image_seeds(seed: int, count: int) -> list[int]:
    """Return one seed per image: the first is ``seed`` (or a random one for -1), then +1 each."""
    first = secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


@dataclass
class Progress:
    kind: str  # "waiting", "loading", "step", "saving", "cancelled", "done"
    step: int = 0
    total: int = 0
    detail: str = ""
    preview: Any = None  # on some "step" updates: a small PIL preview of the job's first image


class GenerationJob:
    """One job as its Gradio handler uses it: progress updates, the result, and cancel."""

    def __init__(self, request: GenerationRequest, owner: str, save: bool = True, previews: bool = True):
        self.request = request
        self.owner = owner
        self.save = save
        # Whether step updates carry preview images. Decoding a preview costs CPU on the
        # step callback, so a caller that never shows them turns them off.
        self.previews = previews
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.updates: queue.Queue[Progress] = queue.Queue()
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.steps_after_cancel = 0
        # Set by the batch collector while the job waits, so a cancel ends it at once.
        self.on_cancel: Callable[[GenerationJob], None] | None = None

    def cancel(self) -> None:
        if not self.finished.is_set() and not self.cancelled.is_set():
            self.cancelled.set()
            logger.info("job for owner %s cancelled", self.owner[:12])
            if self.on_cancel is not None:
                self.on_cancel(self)

    def finish_cancelled(self) -> None:
        """End a job that was cancelled before it reached a model."""
        self.error = JobCancelled("job cancelled before it started")
        self.finished.set()
        self.updates.put(Progress("cancelled"))

    def progress(self, poll_seconds: float = 0.2) -> Iterator[Progress | None]:
        """Yield progress updates until the job ends; yield None every ``poll_seconds`` meanwhile.

        The Nones let a Gradio generator handler yield often, because Gradio can only close
        a generator (and so notice a cancel) at a ``yield``.
        """
        while True:
            try:
                update = self.updates.get(timeout=poll_seconds)
            except queue.Empty:
                update = None
            if update is not None and update.kind == "done":
                return
            if update is not None:
                yield update
                continue
            if self.finished.is_set() and self.updates.empty():
                return
            yield None

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self.finished.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


SaveFn = Callable[[GenerationResult, str], list[str]]


class GeneratorService:
    """Runs generation jobs on the model manager's replicas and hands results to the gallery.

    Jobs go through a ``BatchCollector``: compatible jobs that wait for the same replica run as
    one pipeline call, each with its own seeds, progress and cancel flag.
    """

    def __init__(self, preset: Preset, models: ModelManager, save: SaveFn | None = None):
        self.preset = preset
        self.models = models
        self.save = save
        self._collector: BatchCollector | None = None
        self._collector_lock = threading.Lock()

    @property
    def family(self) -> ModelFamily:
        return self.models.family

    @property
    def max_batch_size(self) -> int:
        """Jobs per pipeline call: the preset's figure, or 1 for families not proven batch-safe."""
        if self.family.name not in BATCH_SAFE_FAMILIES:
            return 1
        return self.preset.queue.max_batch_size

    def check(self, params: dict[str, Any]) -> GenerationRequest:
        return check_inputs(self.preset, self.family, params)

    def start(
        self, request: GenerationRequest, owner: str = "local", *, save: bool = True, previews: bool = True
    ) -> GenerationJob:
        """Queue a job for the next free replica.

        ``save=False`` keeps its images out of the gallery; ``previews=False`` leaves preview
        images out of its step updates.
        """
        job = GenerationJob(request, owner, save, previews)
        job.updates.put(Progress("waiting"))
        self._get_collector().submit(job)
        return job

    def generate(self, request: GenerationRequest, owner: str = "local") -> GenerationResult:
        """Run one job and wait for its result."""
        return self.start(request, owner).wait()

    def close(self) -> None:
        if self._collector is not None:
            self._collector.close()

    def _get_collector(self) -> BatchCollector:
        with self._collector_lock:
            if self._collector is None:
                window = self.preset.queue.batch_window_ms
                self._collector = BatchCollector(
                    self._run_batch,
                    slots=self.models.replica_count,
                    max_batch_size=self.max_batch_size,
                    max_images=max(self.preset.queue.max_batch_images, self.preset.generator.limits.max_num_images),
                    window_seconds=None if window == "auto" else float(window) / 1000,
                )
            return self._collector

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        started = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(jobs)
        try:
            with self.models.acquire(
                cancelled=AllCancelled(jobs),
                on_loading=lambda what: [job.updates.put(Progress("loading", detail=what)) for job in jobs],
            ) as replica:
                results = self._run_with_retry(jobs, replica)
        except JobCancelled as exc:
            for job in jobs:
                job.error = exc
                logger.info("job stopped after cancel; %d step(s) ran after the cancel", job.steps_after_cancel)
        except KitError as exc:
            logger.warning("job failed: %s", exc)
            for job in jobs:
                job.error = exc
        except Exception as exc:  # reported to the visitor as a generic failure, logged in full
            logger.exception("job failed unexpectedly")
            for job in jobs:
                job.error = exc

        # Saving happens after the replica is released, so gallery writes never hold the GPU.
        for job, result in zip(jobs, results):
            try:
                if job.error is None:
                    self._finish(job, result, started)
            except Exception as exc:  # one job's failed save must not fail the others
                if not isinstance(exc, KitError):
                    logger.exception("saving a job's images failed")
                job.error = exc
            finally:
                job.finished.set()
                # Wakes the handler's progress loop at once instead of at its next poll.
                job.updates.put(Progress("done"))

    def _finish(self, job: GenerationJob, result: GenerationResult | None, started: float) -> None:
        if job.cancelled.is_set() or result is None:
            job.error = JobCancelled("job cancelled")
            logger.info("job stopped after cancel; %d step(s) ran after the cancel", job.steps_after_cancel)
            return
        result.seconds = time.perf_counter() - started
        if job.save and self.save is not None:
            job.updates.put(Progress("saving"))
            result.entry_ids = self.save(result, job.owner)
        job.result = result
        logger.info(
            "job finished: %d image(s) %dx%d, %d steps, %.2f s, prompt of %d characters",
            len(result.images),
            job.request.width,
            job.request.height,
            job.request.steps,
            result.seconds,
            len(job.request.prompt),
        )

    def _run_with_retry(self, jobs: list[GenerationJob], replica: Replica) -> list[GenerationResult | None]:
        import torch

        first = jobs[0].request

        def attempt() -> list[GenerationResult | None]:
            return self.models.run_on_gpu(
                lambda: run_pipeline(jobs, replica, self.preset, self.family),
                steps=first.steps,
                width=first.width,
                height=first.height,
                num_images=sum(job.request.num_images for job in jobs),
            )

        try:
            return attempt()
        except torch.OutOfMemoryError:
            logger.warning("out of memory on %s; retrying once with a lower-memory plan", replica.device)
            if AllCancelled(jobs).is_set() or not self.models.degrade(replica):
                raise GenerationFailed("the server ran out of GPU memory; try a smaller size or fewer images.") from None
        try:
            return attempt()
        except torch.OutOfMemoryError:
            from kit.models import release_cached_memory

            release_cached_memory()
            raise GenerationFailed(
                "the server ran out of GPU memory even with a lower-memory plan; try a smaller size or fewer images."
            ) from None


def truncate_prompt(tokenizer: Any, prompt: str, window: int) -> tuple[str, int]:
    """Return the part of ``prompt`` that the text encoder reads, and the prompt's token count.

    The count excludes the start and end tokens that the pipeline adds around the text.
    """
    if tokenizer is None:
        return prompt, 0
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    room = window - 2
    if len(ids) <= room:
        return prompt, len(ids)
    kept = tokenizer.decode(ids[:room], skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return kept.strip(), len(ids)


def _prompt_for_model(job: GenerationJob, tokenizer: Any, window: int) -> tuple[str, str, list[str]]:
    """Cut a job's prompts to the text encoder's window; return them with notices for the visitor."""
    request = job.request
    notices: list[str] = []
    prompt, tokens = truncate_prompt(tokenizer, request.prompt, window)
    if prompt != request.prompt:
        dropped = request.prompt[len(prompt) :].strip() if request.prompt.startswith(prompt) else ""
        notices.append(
            f"The prompt has {tokens} tokens and the model reads {window - 2}; "
            f"the rest was dropped{': ' + repr(dropped[:80]) if dropped else ''}."
        )
        logger.warning("prompt truncated from %d to %d tokens", tokens, window - 2)
    negative_prompt, _ = truncate_prompt(tokenizer, request.negative_prompt, window)
    return prompt, negative_prompt, notices


def run_pipeline(
    jobs: list[GenerationJob], replica: Replica, preset: Preset, family: ModelFamily
) -> list[GenerationResult | None]:
    """Run compatible jobs as one pipeline call on a replica that the caller holds.

    Returns one result per job, None for a job cancelled meanwhile. Raises JobCancelled when
    every job was cancelled, which interrupts the call within one denoising step.
    """
    import torch

    first = jobs[0].request
    pipe = replica.pipelines[first.mode]

    # 1. Prompts: cut each to the text encoder's window and tell its visitor what was dropped.
    tokenizer = getattr(pipe, "tokenizer", None)
    window = getattr(tokenizer, "model_max_length", family.text_window) or family.text_window
    prepared = [_prompt_for_model(job, tokenizer, window) for job in jobs]

    # 2. Seeds: one torch.Generator per image, so any image can be rebuilt alone.
    seeds = [image_seeds(job.request.seed, job.request.num_images) for job in jobs]
    on_device = replica.device != "cpu" and replica.plan is not None and replica.plan.strategy.value == "gpu"
    generator_device = replica.device if on_device else "cpu"
    prompts, negatives, generators, images_in = [], [], [], []
    for job, (prompt, negative_prompt, _), job_seeds in zip(jobs, prepared, seeds):
        for seed in job_seeds:
            prompts.append(prompt)
            negatives.append(negative_prompt)
            generators.append(torch.Generator(device=generator_device).manual_seed(seed))
            if job.request.init_image is not None:
                images_in.append(job.request.init_image)

    # 3. Step callback: progress out to each job, cancel in from all of them.
    total = first.steps if first.init_image is None else int(first.steps * first.strength)
    everyone_left = AllCancelled(jobs)
    # Index of each job's first image in the batch's latents.
    first_images = [sum(len(s) for s in seeds[:index]) for index in range(len(jobs))]
    previews = {"last": -math.inf, "on": True}
    last_update = {"time": -math.inf}

    def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        preview_due = previews["on"] and now - previews["last"] >= PREVIEW_INTERVAL_SECONDS
        if preview_due:
            previews["last"] = now
        update_due = preview_due or step + 1 >= total or now - last_update["time"] >= PROGRESS_INTERVAL_SECONDS
        if update_due:
            last_update["time"] = now
        for job, first_image in zip(jobs, first_images):
            if job.cancelled.is_set():
                job.steps_after_cancel += 1
            elif update_due:
                preview = None
                if preview_due and job.previews:
                    preview = _step_preview(callback_kwargs, first_image, family, first, previews)
                job.updates.put(Progress("step", step=step + 1, total=total, preview=preview))
        if everyone_left.is_set():
            pipeline._interrupt = True
        return callback_kwargs

    kwargs: dict[str, Any] = {
        "prompt": prompts,
        # None and a list of empty strings encode the same unconditional text; None is cheaper.
        "negative_prompt": negatives if any(negatives) else None,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
        "generator": generators,
        "callback_on_step_end": on_step_end,
        "output_type": "latent",
    }
    if images_in:
        kwargs["image"] = images_in
        kwargs["strength"] = first.strength
    else:
        kwargs["width"] = first.width
        kwargs["height"] = first.height
    if family.name == "sdxl" and not images_in:
        kwargs["original_size"] = kwargs["target_size"] = (first.height, first.width)

    # 4. Denoise.
    vae = pipe.vae
    if first.width * first.height > preset.memory.vae_tiling_pixels:
        vae.enable_tiling()
    elif replica.plan is None or not replica.plan.vae_tiling:
        vae.disable_tiling()
    for job in jobs:
        job.updates.put(Progress("step", step=0, total=total))
    with torch.inference_mode():
        latents = pipe(**kwargs).images
    if everyone_left.is_set():
        raise JobCancelled("job cancelled")

    # 5. Decode the images of the jobs still wanted, with the black-image guard.
    results: list[GenerationResult | None] = []
    offset = 0
    for job, (prompt, negative_prompt, notices), job_seeds in zip(jobs, prepared, seeds):
        count = len(job_seeds)
        job_latents = latents[offset : offset + count]
        offset += count
        if job.cancelled.is_set():
            results.append(None)
            continue
        request = job.request
        settings = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "width": request.width,
            "height": request.height,
            "strength": request.strength if request.init_image is not None else None,
            "mode": request.mode,
            "scheduler": type(pipe.scheduler).__name__,
            "kit_version": __version__,
        }
        results.append(
            GenerationResult(
                images=decode_latents(pipe, job_latents),
                seeds=job_seeds,
                settings=settings,
                model=preset.generator.model,
                notices=notices,
            )
        )
    return results


def _step_preview(
    callback_kwargs: dict[str, Any], index: int, family: ModelFamily, request: GenerationRequest, previews: dict
) -> Any:
    """Return a PIL preview of image ``index`` of the step's latents; turn previews off if one fails."""
    from kit.preview import PREVIEW_MAX_SIDE, preview_image

    latents = callback_kwargs.get("latents")
    if latents is None:
        return None
    try:
        # No larger than the image itself: Gradio encodes each preview as PNG, and the
        # browser scales it up for free.
        side = min(PREVIEW_MAX_SIDE, max(request.width, request.height))
        return preview_image(latents[index : index + 1], family.name, height=request.height, width=request.width, max_side=side)
    except (ValueError, RuntimeError) as exc:
        previews["on"] = False
        logger.warning("live previews turned off for this pipeline call: %s", exc)
        return None


def _decode(vae: Any, latents: Any) -> Any:
    import torch

    scaled = latents.to(dtype=vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    with torch.inference_mode():
        return vae.decode(scaled, return_dict=False)[0]


def _looks_broken(decoded: Any) -> bool:
    import torch

    if not torch.isfinite(decoded).all():
        return True
    # The VAE outputs [-1, 1]; an image whose every pixel stays near -1 is black.
    brightest = ((decoded.float().amax(dim=(1, 2, 3)) + 1) * 127.5).min().item()
    return brightest <= BLACK_IMAGE_MAX


def decode_latents(pipe: Any, latents: Any) -> list[Any]:
    """Decode latents to PIL images; retry in float32 when the result is non-finite or black.

    Raises GenerationFailed rather than return a black image, so one is never saved as a success.
    """
    import torch

    vae = pipe.vae
    if not torch.isfinite(latents).all():
        raise GenerationFailed("the model produced invalid values for this request; try another seed or fewer steps.")
    decoded = _decode(vae, latents)
    if _looks_broken(decoded) and vae.dtype != torch.float32:
        logger.warning("decode in %s gave a non-finite or black image; decoding again in float32", vae.dtype)
        original = vae.dtype
        vae.to(torch.float32)
        try:
            decoded = _decode(vae, latents.float())
        finally:
            vae.to(original)
    if _looks_broken(decoded):
        raise GenerationFailed("the model produced a black or invalid image; try another seed or prompt.")
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")


def result_settings_for_entry(result: GenerationResult, index: int) -> dict[str, Any]:
    """Return the settings that rebuild image ``index`` of a result on its own."""
    return {**result.settings, "seed": result.seeds[index], "num_images": 1, "model": result.model}


__all__ = [
    "GenerationJob",
    "GenerationRequest",
    "GenerationResult",
    "GeneratorService",
    "Progress",
    "check_inputs",
]
