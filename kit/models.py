"""The model manager: the only code that loads, places, offloads or frees weights.

One ``ModelManager`` is created by ``app.py`` and passed to the features. It keeps one
replica per device. A job takes a free replica with ``acquire()``, which loads the models
lazily, and gives it back when the ``with`` block ends. Because the replica stays taken
until the pipeline call has really returned, a cancelled job always ends before the next
one starts on the same weights, whatever Gradio's queue believes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from kit import zerogpu
from kit.errors import JobCancelled, KitError, ModelUnavailable
from kit.families import ModelFamily, family_for_pipeline_class
from kit.loading import BUILTIN_PREFIX, resolve_family, resolve_source
from kit.presets import Preset

logger = logging.getLogger(__name__)

TEXT2IMAGE = "text2image"
IMAGE2IMAGE = "image2image"
GIB = 1024**3

Result = TypeVar("Result")


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


def count_devices(setting: str | tuple[str, ...]) -> int:
    """Return how many replicas ``memory.devices`` gives, without creating a CUDA context.

    ``torch.cuda.device_count()`` reads the count from the driver and leaves torch's CUDA state
    uninitialised, which Hugging Face ZeroGPU requires of the main process.
    """
    if isinstance(setting, tuple):
        return len(setting)
    if setting != "all":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


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
        self.zerogpu = zerogpu.is_active()
        if self.zerogpu:
            # spaces patches torch, so it must be imported before anything uses CUDA.
            zerogpu.import_spaces()
            logger.info("Hugging Face ZeroGPU detected: model calls run inside spaces.GPU")

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
        """Number of replicas, known before any is created and without touching CUDA."""
        if self._replicas is not None:
            return len(self._replicas)
        if self._devices is not None:
            return len(self._devices)
        return count_devices(self.preset.memory.devices)

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
        swapped = False
        try:
            self._ensure_loaded(replica, need_generator, need_captioner, on_loading)
            if need_captioner and not need_generator:
                swapped = self._swap_in_captioner(replica)
            yield replica
        finally:
            try:
                if swapped:
                    self._swap_out_captioner(replica)
            finally:
                self._release(replica)

    def preload(self, *, generator: bool = True, captioner: bool = False) -> None:
        """Load the requested models on every replica, one replica at a time (for warm-up)."""
        for replica in self.replicas:
            self._take_replica(None, only=replica)
            try:
                self._ensure_loaded(replica, generator, captioner, None)
            finally:
                self._release(replica)

    def _ensure_loaded(
        self,
        replica: Replica,
        need_generator: bool,
        need_captioner: bool,
        on_loading: Callable[[str], None] | None,
    ) -> None:
        if need_generator and not replica.generator_loaded:
            if on_loading:
                on_loading("generator")
            self._load_generator(replica)
        if need_captioner and replica.captioner is None:
            if on_loading:
                on_loading("captioner")
            self._load_captioner(replica)

    def _take_replica(self, cancelled: threading.Event | None, only: Replica | None = None) -> Replica:
        """Mark a free replica busy and return it; with ``only``, wait for that one replica."""
        replicas = self.replicas if only is None else [only]
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

    def _release(self, replica: Replica) -> None:
        replica.last_used = self._clock()
        with self._condition:
            replica.busy = False
            self._condition.notify_all()

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

    def _captioner_sizes(self, replica: Replica) -> list[Any]:
        """Size the describe model for a plan: none when describe is off, 0 bytes when unknown.

        A loaded captioner is counted directly. Otherwise its configs are counted on the meta
        device: the built folder for a ``builtin:`` model, the kit's architecture configs,
        a local folder or the hub cache for the others. A model that cannot be sized this
        way is logged and counted as 0 bytes, so the generator still loads.
        """
        from kit.memory import ComponentSize, component_sizes

        if not self.preset.features.describe:
            return []
        if replica.captioner is not None:
            model = replica.captioner[0]
            return component_sizes({type(model).__name__: model}, None)
        reference = self.preset.describe.model
        try:
            from kit.architectures import folder_component_sizes, meta_component_sizes

            if reference.startswith(BUILTIN_PREFIX):
                folder = resolve_source(reference, self.models_dir, "config.json").path
                return folder_component_sizes(Path(folder), None)
            return meta_component_sizes(reference, None)
        except (ImportError, KeyError, ValueError, OSError, KitError) as exc:
            logger.warning("could not size describe model %s, so the memory plan counts it as 0 bytes: %s", reference, exc)
            return [ComponentSize("captioner", 0, 0)]

    def plan_for(self, replica: Replica, *, width: int, height: int, num_images: int) -> Any:
        from kit.memory import component_sizes, cuda_free_bytes, plan_placement

        pipe = replica.pipelines[TEXT2IMAGE]
        free = None if replica.device == "cpu" else cuda_free_bytes(replica.device)
        # Weights already on the device count as free for this plan: they are what it places.
        if free is not None and replica.plan is not None and replica.plan.strategy.value == "gpu":
            free += replica.plan.weights_bytes
        elif free is not None and self._captioner_on_device(replica):
            free += _module_bytes(replica.captioner[0])
        return plan_placement(
            component_sizes(pipe, None),
            self._captioner_sizes(replica),
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
        if replica.captioner is not None and self._captioner_on_device(replica) != plan.captioner_on_gpu:
            # A captioner loaded before this plan went to the device, so move it to the plan's placement.
            self._move_captioner(replica, replica.device if plan.captioner_on_gpu else "cpu")

    # -- captioner offload -------------------------------------------------------------------
    # With captioner placement "offload", the captioner and the generator do not fit on the
    # device together. The captioner stays in CPU memory and moves to the device only for a
    # describe job. Under the "gpu" strategy the generator leaves the device meanwhile, and
    # the offload strategies already keep it in CPU memory between jobs.

    def _captioner_on_device(self, replica: Replica) -> bool:
        if replica.captioner is None:
            return False
        return next(replica.captioner[0].parameters()).device.type != "cpu"

    def _move_captioner(self, replica: Replica, device: str) -> None:
        started = time.perf_counter()
        model = replica.captioner[0]
        model.to(device)
        logger.info(
            "moved captioner to %s in %.2f s: %.1f MiB", device, time.perf_counter() - started, _module_bytes(model) / 2**20
        )

    def _move_generator(self, replica: Replica, device: str) -> None:
        started = time.perf_counter()
        # The image-to-image pipeline shares these components, so it moves with them.
        replica.pipelines[TEXT2IMAGE].to(device)
        logger.info(
            "moved generator to %s in %.2f s: %.1f MiB",
            device,
            time.perf_counter() - started,
            pipeline_bytes(replica.pipelines[TEXT2IMAGE]) / 2**20,
        )

    def _generator_stays_on_device(self, replica: Replica) -> bool:
        from kit.memory import Strategy

        return replica.generator_loaded and replica.plan is not None and replica.plan.strategy is Strategy.GPU

    def _swap_in_captioner(self, replica: Replica) -> bool:
        """Make room for a describe job under an "offload" plan; return whether anything moved."""
        if replica.captioner is None or replica.plan is None or replica.plan.captioner_placement != "offload":
            return False
        if self._generator_stays_on_device(replica):
            self._move_generator(replica, "cpu")
        self._move_captioner(replica, replica.device)
        return True

    def _swap_out_captioner(self, replica: Replica) -> None:
        """Undo ``_swap_in_captioner`` after the describe job, so generation jobs find the plan's placement."""
        try:
            self._move_captioner(replica, "cpu")
            if self._generator_stays_on_device(replica):
                self._move_generator(replica, replica.device)
        except Exception:  # the describe job itself succeeded; a reload restores a clean placement
            logger.exception("moving models back after a describe job failed on %s", replica.device)
            self.unload(replica, "models could not be moved back after a describe job")

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
        _remove_offload_hooks(replica.pipelines)
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

    # -- running ------------------------------------------------------------------------------

    def run_on_gpu(
        self,
        fn: Callable[[], Result],
        *,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        duration_s: int | None = None,
    ) -> Result:
        """Call ``fn()``, inside ``spaces.GPU`` on Hugging Face ZeroGPU.

        The duration requested from ZeroGPU is ``duration_s`` if given (capped like the
        estimate), else estimated from the job's steps, width, height and number of images.
        Off ZeroGPU this is a plain call.
        """
        if duration_s is None and None in (steps, width, height):
            raise ValueError("run_on_gpu needs steps, width and height, or duration_s")
        if not self.zerogpu:
            return fn()
        if duration_s is None:
            duration = zerogpu.estimate_duration(self.family.name, steps, width, height, num_images)
        else:
            duration = min(duration_s, zerogpu.max_duration())
        logger.info("requesting a ZeroGPU slot for %d s", duration)
        return zerogpu.gpu_call(fn, duration)()

    # -- unloading ---------------------------------------------------------------------------

    def unload(self, replica: Replica, reason: str) -> None:
        if not replica.pipelines and replica.captioner is None:
            return
        freed = replica.loaded_bytes
        started = time.perf_counter()
        _remove_offload_hooks(replica.pipelines)
        # No local name may still refer to a pipeline here, or release_cached_memory below
        # would run while its weights are alive and hand nothing back.
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
    """Free unreachable models and hand freed memory back to the device and the OS.

    On the CPU, tensors below glibc's mmap threshold (128 KiB, raised up to 32 MiB as large
    blocks are freed) live in malloc's heaps, and freeing them keeps their pages in the
    process until ``malloc_trim`` returns them to the OS. Larger tensors are unmapped as soon
    as they are freed.
    """
    gc.collect()
    import torch

    # is_initialized, not is_available: emptying the cache must not create a CUDA context.
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _trim_malloc_heaps()


# glibc, loaded on the first release; False where the C library has no malloc_trim.
_libc: Any = None


def _trim_malloc_heaps() -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False  # not glibc (macOS, musl): nothing to trim
    if _libc:
        _libc.malloc_trim(0)


def _remove_offload_hooks(pipelines: dict[str, Any]) -> None:
    for pipe in pipelines.values():
        if hasattr(pipe, "remove_all_hooks"):
            pipe.remove_all_hooks()


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
