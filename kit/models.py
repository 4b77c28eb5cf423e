"""The model manager: the only code that loads, places, offloads or frees weights.

One ``ModelManager`` is created by ``app.py`` and passed to the features. It keeps one
replica per device. A job takes a free replica with ``acquire()``, which loads the models
lazily, and gives it back when the ``with`` block ends. Because the replica stays taken
until the pipeline call has really returned, a cancelled job always ends before the next
one starts on the same weights, whatever Gradio's queue believes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kit.errors import JobCancelled, ModelUnavailable
from kit.families import ModelFamily, family_for_pipeline_class
from kit.loading import resolve_family, resolve_source
from kit.presets import Preset

logger = logging.getLogger(__name__)

TEXT2IMAGE = "text2image"
IMAGE2IMAGE = "image2image"
GIB = 1024**3


@dataclass
class Replica:
    """One copy of the models on one device. Only the job that holds it may touch its models."""

    index: int
    device: str
    busy: bool = False
    pipelines: dict[str, Any] = field(default_factory=dict)
    captioner: tuple[Any, Any] | None = None  # (model, processor)
    plan: Any = None  # kit.memory.MemoryPlan once the generator is placed
    last_used: float = 0.0
    loaded_bytes: int = 0

    @property
    def generator_loaded(self) -> bool:
        return TEXT2IMAGE in self.pipelines


def _module_bytes(module: Any) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += tensor.numel() * tensor.element_size()
    return total


def pipeline_bytes(pipe: Any) -> int:
    import torch

    return sum(_module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))


def list_devices(setting: str | tuple[str, ...]) -> list[str]:
    """Turn the preset's ``memory.devices`` into device names, touching CUDA only when called."""
    if isinstance(setting, tuple):
        return list(setting)
    if setting == "cpu":
        return ["cpu"]
    import torch

    if not torch.cuda.is_available():
        return ["cpu"]
    if setting == "all":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cuda:0"]


class ModelManager:
    """Owns every pipeline and captioner, their placement, their lock and their idle unload."""

    def __init__(
        self,
        preset: Preset,
        data_dir: Path,
        *,
        devices: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.preset = preset
        self.models_dir = Path(data_dir) / "models"
        self._devices = devices
        self._clock = clock
        self._replicas: list[Replica] | None = None
        self._condition = threading.Condition()
        self._idle_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.family: ModelFamily = resolve_family(preset.generator.model, preset.generator.family)
        self.last_plan_summary = "models load on first use"

    # -- replicas ---------------------------------------------------------------------------

    @property
    def replicas(self) -> list[Replica]:
        # Devices are listed on first use, not in __init__, so that building the app never
        # touches CUDA (Hugging Face ZeroGPU forbids CUDA in the main process).
        with self._condition:
            if self._replicas is None:
                devices = self._devices or list_devices(self.preset.memory.devices)
                self._replicas = [Replica(index=i, device=d) for i, d in enumerate(devices)]
            return self._replicas

    @property
    def replica_count(self) -> int:
        if self._devices is not None:
            return len(self._devices)
        if isinstance(self.preset.memory.devices, tuple):
            return len(self.preset.memory.devices)
        return len(self.replicas) if self._replicas is not None else 1

    @contextlib.contextmanager
    def acquire(
        self,
        *,
        cancelled: threading.Event | None = None,
        on_loading: Callable[[str], None] | None = None,
        need_generator: bool = True,
        need_captioner: bool = False,
    ) -> Iterator[Replica]:
        """Take a free replica with the requested models loaded, waiting for one if all are busy.

        Raises JobCancelled if ``cancelled`` is set while waiting, so a job whose visitor has
        left never loads or runs anything.
        """
        replica = self._take_replica(cancelled)
        try:
            if need_generator and not replica.generator_loaded:
                if on_loading:
                    on_loading("generator")
                self._load_generator(replica)
            if need_captioner and replica.captioner is None:
                if on_loading:
                    on_loading("captioner")
                self._load_captioner(replica)
            yield replica
        finally:
            replica.last_used = self._clock()
            with self._condition:
                replica.busy = False
                self._condition.notify_all()

    def _take_replica(self, cancelled: threading.Event | None) -> Replica:
        replicas = self.replicas
        with self._condition:
            while True:
                if cancelled is not None and cancelled.is_set():
                    raise JobCancelled("job cancelled while waiting for the model")
                free = [r for r in replicas if not r.busy]
                if free:
                    # Prefer a replica that already has the models, then the least recently used.
                    free.sort(key=lambda r: (not r.generator_loaded, r.last_used))
                    chosen = free[0]
                    chosen.busy = True
                    return chosen
                self._condition.wait(timeout=0.1)

    # -- loading ----------------------------------------------------------------------------

    def _dtype(self, device: str, requested: str):
        import torch

        from kit.memory import pick_dtype

        return getattr(torch, pick_dtype(device, requested))

    def _load_generator(self, replica: Replica) -> None:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        settings = self.preset.generator
        source = resolve_source(settings.model, self.models_dir, "model_index.json")
        dtype = self._dtype(replica.device, settings.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": source.local_files_only}
        if settings.revision:
            kwargs["revision"] = settings.revision
        if settings.variant and str(dtype) != "torch.float32":
            kwargs["variant"] = settings.variant
        if settings.vae:
            kwargs["vae"] = self._load_vae(settings.vae, dtype)
        started = time.perf_counter()
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load generator model {settings.model}: {exc}") from exc
        if settings.scheduler:
            pipe.scheduler = self._scheduler(settings.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.family = family_for_pipeline_class(type(pipe).__name__)

        image2image = AutoPipelineForImage2Image.from_pipe(pipe)
        image2image.set_progress_bar_config(disable=True)
        replica.pipelines = {TEXT2IMAGE: pipe, IMAGE2IMAGE: image2image}
        self._place(replica)
        replica.loaded_bytes = pipeline_bytes(pipe)
        logger.info(
            "loaded generator %s on %s in %.2f s: %.1f MiB of weights, %s, strategy %s",
            settings.model,
            replica.device,
            time.perf_counter() - started,
            replica.loaded_bytes / 2**20,
            str(dtype).removeprefix("torch."),
            replica.plan.strategy.value if replica.plan else "cpu",
        )

    def _load_vae(self, reference: str, dtype: Any) -> Any:
        from diffusers import AutoencoderKL

        source = resolve_source(reference, self.models_dir, "config.json")
        try:
            return AutoencoderKL.from_pretrained(source.path, dtype=dtype, local_files_only=source.local_files_only)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load VAE {reference}: {exc}") from exc

    @staticmethod
    def _scheduler(name: str, config: Any) -> Any:
        import diffusers

        scheduler_class = getattr(diffusers, name, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ModelUnavailable(f"scheduler {name!r} is not a diffusers scheduler class")
        return scheduler_class.from_config(config)

    def _load_captioner(self, replica: Replica) -> None:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        settings = self.preset.describe
        source = resolve_source(settings.model, self.models_dir, "config.json")
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"local_files_only": source.local_files_only}
        if settings.revision:
            kwargs["revision"] = settings.revision
        try:
            processor = AutoProcessor.from_pretrained(source.path, **kwargs)
            model = BlipForConditionalGeneration.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load describe model {settings.model}: {exc}") from exc
        model.eval()
        captioner_on_gpu = replica.plan.captioner_on_gpu if replica.plan is not None else True
        if replica.device != "cpu" and captioner_on_gpu:
            model.to(replica.device)
        replica.captioner = (model, processor)
        size = _module_bytes(model)
        replica.loaded_bytes += size
        logger.info(
            "loaded captioner %s on %s in %.2f s: %.1f MiB of weights",
            settings.model,
            replica.device if captioner_on_gpu else "cpu",
            time.perf_counter() - started,
            size / 2**20,
        )

    # -- placement --------------------------------------------------------------------------

    def _captioner_sizes(self, dtype_bytes: int) -> list[Any]:
        from kit.memory import ComponentSize

        try:
            from kit.architectures import meta_component_sizes

            return meta_component_sizes(self.preset.describe.model, dtype_bytes)
        except (ImportError, KeyError, ValueError):
            return [ComponentSize("captioner", 0, 0)]

    def plan_for(self, replica: Replica, *, width: int, height: int, num_images: int) -> Any:
        from kit.memory import component_sizes, cuda_free_bytes, plan_placement

        pipe = replica.pipelines[TEXT2IMAGE]
        free = None if replica.device == "cpu" else cuda_free_bytes(replica.device)
        # Weights already on the device count as free for this plan: they are what it places.
        if free is not None and replica.plan is not None and replica.plan.strategy.value == "gpu":
            free += replica.plan.weights_bytes
        return plan_placement(
            component_sizes(pipe, None),
            self._captioner_sizes(4 if replica.device == "cpu" else 2),
            family=self.family,
            width=width,
            height=height,
            num_images=num_images,
            guidance=self.preset.generator.defaults.guidance_scale > 1.0,
            device=replica.device,
            free_bytes=free,
            dtype=str(pipe.dtype).removeprefix("torch."),
            forced=self.preset.memory.strategy,
            headroom_fraction=self.preset.memory.headroom_fraction,
            vae_tiling_pixels=self.preset.memory.vae_tiling_pixels,
            vae_fp16_fix=bool(self.preset.generator.vae),
        )

    def _place(self, replica: Replica, plan: Any = None) -> None:
        d = self.preset.generator.defaults
        lim = self.preset.generator.limits
        if plan is None:
            # Plan for the largest job the preset allows, so no later job needs a new placement.
            plan = self.plan_for(
                replica,
                width=lim.max_size if lim.max_size * lim.max_size <= lim.max_pixels else d.width,
                height=lim.max_size if lim.max_size * lim.max_size <= lim.max_pixels else d.height,
                num_images=lim.max_num_images,
            )
        apply_plan(replica.pipelines, plan, replica.device)
        replica.plan = plan
        self.last_plan_summary = plan.one_line()
        logger.info("memory plan for %s:\n%s", replica.device, plan.summary())

    def degrade(self, replica: Replica) -> bool:
        """Move a replica to the next lower-memory strategy after an out-of-memory error.

        Returns False when there is nothing lower to move to.
        """
        from kit.memory import Strategy, lower_strategy

        release_cached_memory()
        current = replica.plan.strategy if replica.plan else Strategy.CPU
        lower = lower_strategy(current)
        pipe = replica.pipelines.get(TEXT2IMAGE)
        if pipe is not None and replica.plan is not None and not replica.plan.vae_tiling:
            # Tiling is the cheapest step down: it only slows the decode.
            replica.plan = replace(replica.plan, vae_tiling=True, reasons=(*replica.plan.reasons, "VAE tiling turned on after an out-of-memory error"))
            pipe.vae.enable_tiling()
            logger.warning("out of memory on %s: VAE tiling turned on", replica.device)
            return True
        if lower is None or pipe is None:
            return False
        plan = replica.plan.with_strategy(lower, reason="lowered after an out-of-memory error")
        for p in replica.pipelines.values():
            if hasattr(p, "remove_all_hooks"):
                p.remove_all_hooks()
        started = time.perf_counter()
        self._place(replica, plan)
        logger.warning(
            "out of memory on %s: moved from %s to %s in %.2f s",
            replica.device,
            current.value,
            lower.value,
            time.perf_counter() - started,
        )
        return True

    # -- unloading ---------------------------------------------------------------------------

    def unload(self, replica: Replica, reason: str) -> None:
        if not replica.pipelines and replica.captioner is None:
            return
        freed = replica.loaded_bytes
        started = time.perf_counter()
        for pipe in replica.pipelines.values():
            if hasattr(pipe, "remove_all_hooks"):
                pipe.remove_all_hooks()
        replica.pipelines = {}
        replica.captioner = None
        replica.plan = None
        replica.loaded_bytes = 0
        release_cached_memory()
        logger.info(
            "unloaded models from %s (%s) in %.2f s: %.1f MiB of weights released",
            replica.device,
            reason,
            time.perf_counter() - started,
            freed / 2**20,
        )

    def unload_idle(self) -> int:
        """Unload every replica idle for longer than the preset allows; return how many."""
        limit = self.preset.memory.idle_unload_seconds
        if limit <= 0 or self._replicas is None:
            return 0
        count = 0
        now = self._clock()
        for replica in self._replicas:
            with self._condition:
                idle = not replica.busy and (replica.pipelines or replica.captioner is not None)
                if not idle or now - replica.last_used < limit:
                    continue
                replica.busy = True  # keep jobs off it while its memory is released
            try:
                self.unload(replica, f"idle for {now - replica.last_used:.0f} s")
                count += 1
            finally:
                with self._condition:
                    replica.busy = False
                    self._condition.notify_all()
        return count

    def start(self, poll_seconds: float | None = None) -> None:
        """Start the idle-unload watcher. Called by app.py, never at import."""
        limit = self.preset.memory.idle_unload_seconds
        if limit <= 0 or self._idle_thread is not None:
            return
        poll = poll_seconds if poll_seconds is not None else max(0.5, min(30.0, limit / 4))

        def watch() -> None:
            while not self._stopping.wait(poll):
                try:
                    self.unload_idle()
                except Exception:  # the watcher must outlive one failed unload
                    logger.exception("idle unload failed")

        self._idle_thread = threading.Thread(target=watch, name="kit-idle-unload", daemon=True)
        self._idle_thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._idle_thread is not None:
            self._idle_thread.join(timeout=5)
            self._idle_thread = None
        for replica in self._replicas or []:
            self.unload(replica, "shutdown")

    def is_loaded(self) -> bool:
        return any(r.generator_loaded for r in self._replicas or [])


def release_cached_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def apply_plan(pipelines: dict[str, Any], plan: Any, device: str) -> None:
    """Put a replica's pipelines where the plan says.

    The image-to-image pipeline shares its components with the text-to-image one, so it gets
    the same offload hooks; without them its first call mixes CPU and GPU tensors.
    """
    from kit.memory import Strategy

    for pipe in pipelines.values():
        if plan.strategy is Strategy.GPU:
            pipe.to(device)
        elif plan.strategy is Strategy.MODEL_OFFLOAD:
            pipe.enable_model_cpu_offload(device=device)
        elif plan.strategy is Strategy.SEQUENTIAL_OFFLOAD:
            pipe.enable_sequential_cpu_offload(device=device)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            if plan.vae_tiling:
                vae.enable_tiling()
            if plan.vae_slicing:
                vae.enable_slicing()
