"""What image model runs next to the vision chat model on each GPU class, as data.

The vision node runs two engines on one card: vLLM (the vision-language chat model) and the image
engine (a diffusers pipeline). vLLM takes `--gpu-memory-utilization` x card memory up front
(weights, then the KV cache fills the rest of that share), so the share is lowered on vision
nodes to leave room for the image pipeline:

    vLLM:   presets.memory_estimate(vision model, context) <= utilization x card     (as today)
    images: utilization x card + image weights + working memory + CUDA context <= 0.95 x card

Weights are fp16 parameter counts x 2 bytes (UNet + VAE + text encoders):
  SD 2.1 family (SD-Turbo): UNet 865 M + OpenCLIP-H text 354 M + VAE 84 M = 1.30 B -> 2.4 GiB;
  SDXL family (SDXL-Turbo, SDXL 1.0): UNet 2.57 B + CLIP-L 123 M + OpenCLIP-bigG 695 M + VAE 84 M
  = 3.47 B -> 6.5 GiB.
Working memory (activations, VAE decode of one batch at the largest size) and seconds per image
are ESTIMATES until a GPU measures them (docs/images.md says how).

Model cards (huggingface.co/stabilityai/...): SD-Turbo and SDXL-Turbo are distilled to "1 to 4
steps", "do not make use of guidance_scale or negative_prompt, we disable it with
guidance_scale=0.0", and prefer 512x512 ("higher image sizes also work"; for SDXL-Turbo
768/1024 "with a loss in quality"); image-to-image needs num_inference_steps x strength >= 1.
Both are under Stability AI's community licence (commercial use above a revenue threshold needs
a licence: stability.ai/license). SDXL 1.0 base (CreativeML Open RAIL++-M) is native at 1024x1024
and wants ~25-50 steps with guidance ~5-7. Stability quotes 207 ms for a 512x512 SDXL-Turbo
image on an A100. SDXL's VAE overflows in fp16, hence the fp16-fixed VAE
(madebyollin/sdxl-vae-fp16-fix) instead of diffusers upcasting it to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from heady_node import presets
from heady_node.gpu import GPU_CLASSES, GpuClass
from heady_node.image_api import ImageLimits

GIB = 1024**3
IMAGE_SHARE_OF_CARD = 0.95  # vLLM share + image engine; the rest is slack for fragmentation
CUDA_CONTEXT_GIB = 0.5  # the image process's own CUDA context (vLLM's is in its estimate)
SIDE_STEP = 64  # Stable Diffusion latents are 1/8 of the image; 64 keeps every UNet level even


@dataclass(frozen=True)
class ImageModel:
    repo: str
    family: str  # "sd" (SD 2.1 / SD-Turbo) or "sdxl"
    params_b: float  # UNet + VAE + text encoders
    native_side: int
    steps: int
    max_steps: int
    guidance: float
    vae_repo: str | None = None  # replaces the checkpoint's VAE (fp16 fix)
    variant: str | None = "fp16"  # the checkpoint's fp16 weight files
    licence: str = ""

    @property
    def weights_gib(self) -> float:
        return self.params_b * 1e9 * 2 / GIB


SDXL_VAE_FP16 = "madebyollin/sdxl-vae-fp16-fix"
IMAGE_MODELS: dict[str, ImageModel] = {
    m.repo: m
    for m in (
        ImageModel(
            "stabilityai/sd-turbo", "sd", 1.30, 512, 1, 4, 0.0,
            licence="Stability AI Community License",
        ),
        ImageModel(
            "stabilityai/sdxl-turbo", "sdxl", 3.47, 512, 1, 4, 0.0, vae_repo=SDXL_VAE_FP16,
            licence="Stability AI Community License",
        ),
        ImageModel(
            "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 3.47, 1024, 25, 50, 5.0,
            vae_repo=SDXL_VAE_FP16, licence="CreativeML Open RAIL++-M",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class ImagePreset:
    gpu: GpuClass
    model: ImageModel
    vllm_utilization: float  # the vision model's lowered --gpu-memory-utilization
    max_side: int
    max_n: int
    batch: int  # images per pipeline call (n is split into calls of this many)
    working_gib: float  # ESTIMATE: activations + VAE decode of one batch at max_side
    seconds_per_image: float  # ESTIMATE at the native size and default steps
    max_waiting: int = 8

    def limits(self) -> ImageLimits:
        m = self.model
        return ImageLimits(
            default_side=m.native_side,
            max_side=self.max_side,
            side_step=SIDE_STEP,
            max_n=self.max_n,
            steps=m.steps,
            max_steps=m.max_steps,
            guidance=m.guidance,
            # Turbo: 1 step x strength must stay >= 1 step of work; the engine raises the
            # step count for edits so steps x strength >= 1.
            edit_strength=0.6,
        )

    def image_memory_gib(self) -> float:
        return self.model.weights_gib + self.working_gib + CUDA_CONTEXT_GIB

    def vllm_budget_gib(self, memory_gib: float | None = None) -> float:
        card = memory_gib if memory_gib is not None else self.gpu.memory_gib
        return self.vllm_utilization * card


# (image model, vLLM share, largest side, max n, batch, working GiB, s/image) per GPU class.
_TABLE: dict[str, tuple[str, float, int, int, int, float, float]] = {
    "t4": ("stabilityai/sd-turbo", 0.68, 768, 4, 1, 1.0, 0.5),
    "l4": ("stabilityai/sdxl-turbo", 0.57, 768, 4, 1, 1.5, 0.6),
    "a100-40": ("stabilityai/stable-diffusion-xl-base-1.0", 0.62, 1024, 4, 2, 4.0, 4.0),
    "a100-80": ("stabilityai/stable-diffusion-xl-base-1.0", 0.72, 1024, 4, 4, 7.0, 4.0),
    "h100": ("stabilityai/stable-diffusion-xl-base-1.0", 0.72, 1024, 4, 4, 7.0, 2.5),
    "rtx-pro-6000": ("stabilityai/stable-diffusion-xl-base-1.0", 0.78, 1024, 4, 4, 7.0, 3.0),
}


def image_preset(gpu: GpuClass, model: str | None = None) -> ImagePreset:
    """The image preset for a GPU class; `model` swaps the checkpoint (same family limits)."""
    repo, share, side, n, batch, working, secs = _TABLE[gpu.key]
    chosen = IMAGE_MODELS[repo]
    if model:
        if model not in IMAGE_MODELS:
            known = ", ".join(IMAGE_MODELS)
            raise presets.PresetError(f"unknown image model {model!r}; known: {known}")
        chosen = IMAGE_MODELS[model]
        side = max(side, chosen.native_side)
    return ImagePreset(gpu, chosen, share, side, n, batch, working, secs)


def joint_problems(vision: presets.Preset, images: ImagePreset) -> list[str]:
    """Why the two engines would not fit on the card together; empty when they do."""
    problems = []
    card = vision.gpu.memory_gib
    need = presets.memory_estimate(vision.model, vision.max_model_len)
    share = images.vllm_budget_gib(card)
    if vision.model.params_b and need > share:
        problems.append(
            f"{vision.model.repo} needs ~{need:.1f} GiB but vLLM's share "
            f"{images.vllm_utilization:.2f} x {card:.1f} GiB is {share:.1f} GiB"
        )
    total = share + images.image_memory_gib()
    if total > IMAGE_SHARE_OF_CARD * card:
        problems.append(
            f"vLLM {share:.1f} GiB + {images.model.repo} {images.image_memory_gib():.1f} GiB "
            f"= {total:.1f} GiB > {IMAGE_SHARE_OF_CARD:.2f} x {card:.1f} GiB"
        )
    return problems


def table_rows() -> list[tuple[str, str, str, float, int, int, float, float, float]]:
    """(gpu, vision model, image model, vLLM share, side, steps, vLLM GiB, image GiB, s/img)."""
    rows = []
    for gpu in GPU_CLASSES.values():
        vision = presets.preset_for("vision", gpu)
        img = image_preset(gpu)
        rows.append(
            (
                gpu.label,
                vision.model.repo,
                img.model.repo,
                img.vllm_utilization,
                img.model.native_side,
                img.model.steps,
                round(img.vllm_budget_gib(), 1),
                round(img.image_memory_gib(), 1),
                img.seconds_per_image,
            )
        )
    return rows
