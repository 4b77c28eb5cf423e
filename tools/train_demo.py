"""Train the demo models on the shapes world of ``kit.demo_world`` and save them under ``models/``.

    nice -n 19 python tools/train_demo.py            # both models, about forty minutes on one CPU thread
    nice -n 19 python tools/train_demo.py --only sd  # only the text-to-image pipeline

Writes ``models/demo-sd`` (a diffusers StableDiffusionPipeline: AutoencoderKL, CLIP text
encoder and tokenizer, UNet2DConditionModel, DDIM scheduler) and ``models/demo-blip`` (a
BlipForConditionalGeneration captioner with its BlipProcessor), both with save_pretrained
in safetensors. Seeds are fixed and torch runs on one thread, so a rerun on the same
machine and library versions gives the same weights.

Steps: render a data set of scenes. Train the VAE on them (L1 reconstruction, weighted
toward shape edges, plus a small KL term) and freeze it. Encode the data set to latents.
Train the UNet and the text encoder together with DDPM noise, v-prediction and 10% empty
captions (for classifier-free guidance). Train the captioner on the same images. Evaluate
both on the held-out scenes of ``kit.demo_world`` (prompts that training never showed) with
its classifier.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# One thread, so that other people on a shared machine keep a core. Set before torch starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kit import demo_world  # noqa: E402

logger = logging.getLogger("train_demo")

CAPTION_DROPOUT = 0.1  # share of empty captions, which teach the unconditional prediction for guidance
PHRASE_DROPOUT = 0.15  # chance to leave out each optional phrase, so short prompts work too
TRAIN_TIMESTEPS = 1000
SAMPLE_STEPS = 25
# Measured on held-out scenes: 1.5 gave the most scenes right, 5 about a third fewer. A
# stronger push from the prompt over-sharpens these small models into blotches and extra blobs.
GUIDANCE_SCALE = 1.5
TEXT_WIDTH = 64
PROMPT_TOKENS = 24


# -- tokenizers --------------------------------------------------------------------------------


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges the way CLIP's tokenizer does: always the adjacent pair of lowest rank first."""
    while len(pieces) > 1:
        pairs = [(ranks.get((left, right), len(ranks)), index) for index, (left, right) in enumerate(zip(pieces, pieces[1:]))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:index] + [pieces[index] + pieces[index + 1]] + pieces[index + 2 :]
    return pieces


def build_clip_tokenizer():
    """Build a byte-level BPE CLIPTokenizer that reads each word of the world as one token.

    Other text still tokenizes, into pieces that the text encoder never saw in training.
    """
    from transformers import CLIPTokenizer

    from kit.tiny import _byte_alphabet

    vocab: dict[str, int] = {}
    for symbol in _byte_alphabet():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in demo_world.VOCABULARY:
        # Merges of earlier words can split a later one ("r"+"i" of "right" inside "triangle"),
        # so each new merge joins the first two pieces that the merges so far leave.
        letters = list(word[:-1]) + [word[-1] + "</w>"]
        pieces = _apply_merges(letters, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_merges(letters, ranks)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=PROMPT_TOKENS)
    split = [word for word in demo_world.VOCABULARY if len(tokenizer.tokenize(word)) != 1]
    if split:
        raise RuntimeError(f"the CLIP tokenizer splits these words into several tokens: {split}")
    return tokenizer


def build_bert_tokenizer():
    """Build the captioner's BertTokenizer: the world's words, BERT's special tokens and [DEC] as bos."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *demo_world.VOCABULARY, ".", ","]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizer(str(vocab_file), bos_token="[DEC]")


# -- data --------------------------------------------------------------------------------------


def images_to_tensor(images: list) -> torch.Tensor:
    """Stack PIL images into a float tensor in [-1, 1], shape (N, 3, H, W)."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_prompt(scene: demo_world.Scene, rng: random.Random) -> str:
    if rng.random() < CAPTION_DROPOUT:
        return ""
    return scene.caption(
        say_size=rng.random() >= PHRASE_DROPOUT,
        say_position=rng.random() >= PHRASE_DROPOUT,
        say_background=rng.random() >= PHRASE_DROPOUT,
    )


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


# -- VAE ---------------------------------------------------------------------------------------


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(10)
    # Three blocks halve the size twice: 64x64x3 images become 16x16x4 latents. One norm
    # group: with one channel per group, GroupNorm removes each channel's mean over the
    # image, and with it the color of a flat background, which this world is full of.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=demo_world.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def edge_weights(batch: torch.Tensor, edge_weight: float = 4.0) -> torch.Tensor:
    """Return per-pixel loss weights: 1 on flat areas, 1 + ``edge_weight`` within a pixel of a color edge.

    Flat backgrounds are most of every image, so an unweighted loss lets the VAE blur the
    small shapes that the scenes are about.
    """
    step_x = (batch[:, :, :, 1:] - batch[:, :, :, :-1]).abs().sum(dim=1, keepdim=True)
    step_y = (batch[:, :, 1:, :] - batch[:, :, :-1, :]).abs().sum(dim=1, keepdim=True)
    change = torch.nn.functional.pad(step_x, (0, 1, 0, 0)) + torch.nn.functional.pad(step_y, (0, 0, 0, 1))
    edges = torch.nn.functional.max_pool2d((change > 0.1).float(), kernel_size=3, stride=1, padding=1)
    return 1.0 + edge_weight * edges


def train_vae(pixels: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float):
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    noise = torch.Generator().manual_seed(11)
    started = time.perf_counter()
    vae.train()
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, lr, warmup=20))
        index = torch.randint(0, len(pixels), (batch_size,), generator=noise)
        batch = pixels[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise)
        reconstruction = vae.decode(latents).sample
        l1 = (edge_weights(batch) * (reconstruction - batch).abs()).mean()
        kl = posterior.kl().mean()
        loss = l1 + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d: weighted l1 %.5f kl %.1f (%.0f s)", step + 1, steps, l1.item(), kl.item(), time.perf_counter() - started)
    vae.eval().requires_grad_(False)
    return vae


def tensor_to_images(pixels: torch.Tensor) -> list:
    from PIL import Image

    array = pixels.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(item) for item in array]


@torch.no_grad()
def evaluate_vae(vae, images: list, scenes: list[demo_world.Scene]) -> dict[str, float]:
    """Return the reconstruction MSE (pixels in [-1, 1]) and the share of reconstructions the classifier reads right."""
    pixels = images_to_tensor(images)
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    readable = sum(
        demo_world.facts_match(demo_world.scene_facts(scene), demo_world.classify(image).facts())
        for scene, image in zip(scenes, tensor_to_images(reconstruction))
    )
    return {"mse": round(torch.nn.functional.mse_loss(reconstruction, pixels).item(), 5), "classifier": readable / len(scenes)}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the posterior mean and std of every image; the UNet trains on samples from them."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(pixels[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# -- text-to-image -----------------------------------------------------------------------------


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(20)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=PROMPT_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    return CLIPTextModel(config)


def build_unet(latent_size: int, widths: tuple[int, ...], norm_groups: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(21)
    # Cross-attention only below full latent resolution, where it is cheap on a CPU. The
    # "text" addition embedding pools the prompt into the time embedding, which reaches every
    # ResNet block, so colors and kinds condition the whole image from the first step.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=norm_groups,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


# Stable Diffusion's betas, rescaled so that the last timestep is pure noise. Without that,
# the mean of a 16x16 latent keeps some signal at the last step, the model learns to read the
# background color from it, and sampling from pure noise then picks a random background.
# Pure noise at the last step needs v-prediction and sampling that starts at that step.
SCHEDULE = {
    "num_train_timesteps": TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False)


class WeightAverage:
    """Exponential moving average of a model's weights; its copy samples better than the last step."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.parameters = [p for module in modules for p in module.parameters()]
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_models(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            parameter.copy_(shadow)


def train_text_to_image(
    tokenizer, latent_mean, latent_std, scenes, *, steps: int, batch_size: int, widths: tuple[int, ...], norm_groups: int, lr: float, ema_decay: float
):
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(latent_mean.shape[-1], widths, norm_groups)
    scheduler = training_scheduler()
    modules = [unet, text_encoder]
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    average = WeightAverage(modules, ema_decay)
    noise_rng = torch.Generator().manual_seed(22)
    caption_rng = random.Random(23)
    unet.train()
    text_encoder.train()

    started = time.perf_counter()
    running = 0.0
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, lr, warmup=100))
        index = torch.randint(0, len(latent_mean), (batch_size,), generator=noise_rng)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=noise_rng)
        prompts = [training_prompt(scenes[i], caption_rng) for i in index.tolist()]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

        noise = torch.randn(latents.shape, generator=noise_rng)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (batch_size,), generator=noise_rng)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        average.update(step)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info("unet step %d/%d: loss %.4f (average %.4f) (%.0f s)", step + 1, steps, loss.item(), running, time.perf_counter() - started)

    average.copy_to_models()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate_generator(pipe, scenes: list[demo_world.Scene], seed: int, batch_size: int = 16) -> dict[str, float]:
    """Draw each scene's caption once and return the share the classifier reads as asked."""
    pairs: list[tuple[demo_world.CaptionFacts, demo_world.CaptionFacts]] = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(
            [scene.caption() for scene in chunk],
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=GUIDANCE_SCALE,
            height=demo_world.IMAGE_SIZE,
            width=demo_world.IMAGE_SIZE,
            generator=generators,
        ).images
        pairs += [(demo_world.scene_facts(scene), demo_world.classify(image).facts()) for scene, image in zip(chunk, images)]
    return score_facts(pairs)


def score_facts(pairs: list[tuple[demo_world.CaptionFacts, demo_world.CaptionFacts]]) -> dict[str, float]:
    """Return the share of (expected, seen) pairs that agree in full, on the background, and on shape colors and kinds."""
    results = {"all": 0, "background": 0, "shape_color": 0, "shape_kind": 0}
    for expected, seen in pairs:
        results["all"] += demo_world.facts_match(expected, seen)
        results["background"] += expected.background == seen.background
        results["shape_color"] += sorted(c for c, _ in expected.shapes) == sorted(c for c, _ in seen.shapes)
        results["shape_kind"] += sorted(k for _, k in expected.shapes) == sorted(k for _, k in seen.shapes)
    return {name: count / len(pairs) for name, count in results.items()}


# -- captioner ---------------------------------------------------------------------------------


def build_captioner(tokenizer, image_size: int, width: int):
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(30)
    vocab = tokenizer.get_vocab()
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": width,
            "intermediate_size": width * 2,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "encoder_hidden_size": width,
            "max_position_embeddings": 32,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": width * 2,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=width,
    )
    return BlipForConditionalGeneration(config)


def build_processor(tokenizer, image_size: int):
    from transformers import BlipImageProcessor, BlipProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_captioner(processor, images, scenes, *, steps: int, batch_size: int, lr: float, image_size: int, width: int):
    tokenizer = processor.tokenizer
    model = build_captioner(tokenizer, image_size, width)
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    encoded = tokenizer([scene.caption() for scene in scenes], padding="longest", return_tensors="pt")
    input_ids = encoded.input_ids.clone()
    # The decoder starts from the [DEC] token, as BlipForConditionalGeneration.generate does.
    input_ids[:, 0] = model.config.text_config.bos_token_id
    labels = input_ids.masked_fill(encoded.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    rng = torch.Generator().manual_seed(31)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        set_lr(optimizer, cosine_lr(step, steps, lr, warmup=50))
        index = torch.randint(0, len(images), (batch_size,), generator=rng)
        output = model(
            pixel_values=pixel_values[index],
            input_ids=input_ids[index],
            attention_mask=encoded.attention_mask[index],
            labels=labels[index],
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("captioner step %d/%d: loss %.4f (%.0f s)", step + 1, steps, output.loss.item(), time.perf_counter() - started)
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def caption_images(model, processor, images) -> list[str]:
    inputs = processor(images=images, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=20, num_beams=1)
    return processor.batch_decode(output, skip_special_tokens=True)


def evaluate_captioner(model, processor, images, scenes) -> dict[str, float]:
    captions = caption_images(model, processor, images)
    return score_facts([(demo_world.scene_facts(scene), demo_world.parse_caption(caption)) for caption, scene in zip(captions, scenes)])


# -- main --------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def held_out_set(count: int, seed: int) -> tuple[list, list[demo_world.Scene]]:
    rng = random.Random(seed)
    scenes = demo_world.held_out_scenes(rng, count)
    return [demo_world.render(scene, rng) for scene in scenes], scenes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "models", help="folder that receives demo-sd and demo-blip")
    parser.add_argument("--only", choices=("sd", "blip"), help="train only the text-to-image pipeline or only the captioner")
    parser.add_argument("--images", type=int, default=20000, help="number of training scenes to render")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training data set")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE optimizer steps")
    parser.add_argument("--vae-batch", type=int, default=16, help="VAE batch size")
    parser.add_argument("--vae-lr", type=float, default=4e-3, help="VAE peak learning rate")
    parser.add_argument("--vae-kl-weight", type=float, default=1e-5, help="weight of the VAE's KL term (summed over latent values)")
    parser.add_argument("--vae-from", type=Path, help="load a saved VAE folder instead of training one")
    parser.add_argument("--unet-steps", type=int, default=4000, help="UNet and text encoder optimizer steps")
    parser.add_argument("--unet-batch", type=int, default=32, help="UNet batch size")
    parser.add_argument("--unet-widths", default="32,64,64", help="UNet block_out_channels, comma separated")
    parser.add_argument("--unet-groups", type=int, default=8, help="UNet norm_num_groups")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="UNet and text encoder peak learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="decay of the weight average that is saved")
    parser.add_argument("--blip-steps", type=int, default=5000, help="captioner optimizer steps")
    parser.add_argument("--blip-batch", type=int, default=64, help="captioner batch size")
    parser.add_argument("--blip-lr", type=float, default=1e-3, help="captioner peak learning rate")
    parser.add_argument("--blip-width", type=int, default=64, help="hidden size of the captioner's vision and text towers")
    parser.add_argument("--blip-image-size", type=int, default=64, help="image size of the captioner, in pixels")
    parser.add_argument("--eval-count", type=int, default=96, help="held-out scenes per evaluation")
    parser.add_argument("--report", type=Path, help="markdown file whose \"Demo models\" section gets the figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    cpu_started = time.process_time()
    summary: dict[str, object] = {"threads": torch.get_num_threads()}

    images, scenes = demo_world.make_dataset(args.images, args.seed)
    eval_images, eval_scenes = held_out_set(args.eval_count, seed=10_000 + args.seed)
    logger.info("rendered %d training scenes in %.0f s", len(images), time.perf_counter() - started)

    if args.only in (None, "sd"):
        stage = time.perf_counter()
        pixels = images_to_tensor(images)
        if args.vae_from:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae_from).eval().requires_grad_(False)
        else:
            vae = train_vae(pixels, args.vae_steps, args.vae_batch, args.vae_lr, kl_weight=args.vae_kl_weight)
        summary["vae_held_out"] = evaluate_vae(vae, eval_images, eval_scenes)
        latent_mean, latent_std = encode_latents(vae, pixels)
        # Scale by the spread of what the UNet trains on: posterior samples, not means.
        sample_rng = torch.Generator().manual_seed(12)
        scaling = 1.0 / (latent_mean + latent_std * torch.randn(latent_mean.shape, generator=sample_rng)).std().item()
        vae.register_to_config(scaling_factor=scaling)
        summary["vae_seconds"] = round(time.perf_counter() - stage)
        logger.info("vae done: held-out %s, scaling factor %.3f", summary["vae_held_out"], scaling)

        stage = time.perf_counter()
        tokenizer = build_clip_tokenizer()
        widths = tuple(int(value) for value in args.unet_widths.split(","))
        unet, text_encoder = train_text_to_image(
            tokenizer,
            latent_mean * scaling,
            latent_std * scaling,
            scenes,
            steps=args.unet_steps,
            batch_size=args.unet_batch,
            widths=widths,
            norm_groups=args.unet_groups,
            lr=args.unet_lr,
            ema_decay=args.ema_decay,
        )
        summary["unet_seconds"] = round(time.perf_counter() - stage)
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
        stage = time.perf_counter()
        summary["generator_held_out"] = evaluate_generator(pipe, eval_scenes, seed=20_000)
        summary["generator_eval_seconds"] = round(time.perf_counter() - stage)
        logger.info("generator on held-out scenes: %s", summary["generator_held_out"])
        target = args.output / "demo-sd"
        pipe.save_pretrained(target, safe_serialization=True)
        summary["demo_sd_bytes"] = folder_bytes(target)

    if args.only in (None, "blip"):
        stage = time.perf_counter()
        processor = build_processor(build_bert_tokenizer(), args.blip_image_size)
        captioner = train_captioner(
            processor,
            images,
            scenes,
            steps=args.blip_steps,
            batch_size=args.blip_batch,
            lr=args.blip_lr,
            image_size=args.blip_image_size,
            width=args.blip_width,
        )
        summary["blip_seconds"] = round(time.perf_counter() - stage)
        summary["captioner_held_out"] = evaluate_captioner(captioner, processor, eval_images, eval_scenes)
        logger.info("captioner on held-out scenes: %s", summary["captioner_held_out"])
        target = args.output / "demo-blip"
        captioner.save_pretrained(target, safe_serialization=True)
        processor.save_pretrained(target)
        summary["demo_blip_bytes"] = folder_bytes(target)

    summary["total_seconds"] = round(time.perf_counter() - started)
    summary["total_cpu_seconds"] = round(time.process_time() - cpu_started)
    print(json.dumps(summary, indent=2))
    if args.report and args.only is None:
        from bench.report import write_section

        write_section(args.report, "Demo models", render_report(summary, args))
        logger.info("wrote the Demo models section of %s", args.report)
    return 0


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def render_report(summary: dict, args: argparse.Namespace) -> str:
    """Return the markdown of the "Demo models" section: time per stage and held-out accuracy."""
    generator, captioner, vae = summary["generator_held_out"], summary["captioner_held_out"], summary["vae_held_out"]
    megabytes = (summary["demo_sd_bytes"] + summary["demo_blip_bytes"]) / 2**20
    return "\n".join(
        [
            f"Command: `python tools/train_demo.py --report docs/benchmarks.md`; run {time.strftime('%Y-%m-%d')} on "
            f"{os.cpu_count()} CPU cores with {summary['threads']} torch thread, from scratch with the default seeds. "
            f"Data: {args.images:,} rendered training scenes. Evaluation: {args.eval_count} held-out scenes "
            f"({demo_world.HELD_OUT_COUNT} prompts that training never showed, drawn with new color jitter), read by "
            "the classifier in `kit/demo_world.py`.",
            "",
            "| stage | optimizer steps | seconds | held-out result |",
            "|---|---|---|---|",
            f"| VAE | {args.vae_steps} | {summary['vae_seconds']} | reconstruction MSE {vae['mse']}, classifier reads "
            f"{_percent(vae['classifier'])} of reconstructions right |",
            f"| UNet and CLIP text encoder | {args.unet_steps} | {summary['unet_seconds']} | drawn scene right in "
            f"{_percent(generator['all'])} ({SAMPLE_STEPS} DDIM steps, guidance {GUIDANCE_SCALE:g}) |",
            f"| BLIP captioner | {args.blip_steps} | {summary['blip_seconds']} | caption right in {_percent(captioner['all'])} |",
            "",
            "| | everything right | background color | shape color | shape kind |",
            "|---|---|---|---|---|",
            f"| generator (prompt to image) | {_percent(generator['all'])} | {_percent(generator['background'])} | "
            f"{_percent(generator['shape_color'])} | {_percent(generator['shape_kind'])} |",
            f"| captioner (image to caption) | {_percent(captioner['all'])} | {_percent(captioner['background'])} | "
            f"{_percent(captioner['shape_color'])} | {_percent(captioner['shape_kind'])} |",
            "",
            f"Whole run: {summary['total_seconds']} s ({summary['total_cpu_seconds']} s of CPU time). "
            f"Weights in `models/`: {megabytes:.1f} MB in safetensors. `tests/test_demo_eval.py` checks the shipped "
            "models against the same kind of held-out scenes with its own seeds, and needs at least 80% right.",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
