"""Stable Diffusion behind the ``ScoreModel`` interface, loaded from the Hub or a local folder.

``load_sd_components`` loads the parts of any diffusers Stable Diffusion pipeline (VAE,
CLIP tokenizer + text encoder, UNet, a scheduler built from the model's own scheduler
config) given as a Hub id or a folder written by ``save_pretrained``. A Hub id is looked
up in the local Hugging Face cache first and downloaded only when that fails and
downloads are allowed, so an offline machine fails at once with a message saying what to
download and where to put it, instead of hanging or printing a traceback.

``StableDiffusionScoreModel`` is the ``ScoreModel`` the auditing methods use:

- ``encode``: images in [0, 1] -> VAE latents. The posterior *mean* is used, not a sample
  (the original sampled ``latent_dist``): the audit then depends only on the noise drawn
  for x_t, and the same image always gives the same x0.
- prompts are tokenised and encoded once per model object and cached;
- ``predict_eps`` evaluates all K prompts for a batch of B noisy latents in one UNet call
  and returns epsilon whatever the scheduler's ``prediction_type`` (SD 2.1 at 768 px
  predicts v).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from bias_begets_bias.cli import InputError
from bias_begets_bias.hub import DEFAULT_MODEL, PIPELINE_PARTS, resolve_device, resolve_dtype, resolve_pipeline_folder
from statistical_auditing.core.score_interface import DEFAULT_INFERENCE_STEPS, ScoreModel, timestep_table, to_epsilon

SCHEDULERS = ("ddpm", "ddim", "euler")
TEXT_PARTS = ("text_encoder", "tokenizer")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _load_part(cls: Any, folder: Path, part: str, **kwargs: Any) -> Any:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keep stderr for our own one-line errors
    try:
        return cls.from_pretrained(str(folder / part), local_files_only=True, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot load the {part} of the pipeline in {folder} with {cls.__name__}: "
                         f"{type(error).__name__}: {str(error)[:300]}") from error


# ----------------------------------------------------------------------------- schedulers


def build_scheduler(folder: Path, kind: str = "ddpm") -> Any:
    """The scheduler ``kind`` built from the pipeline's own scheduler config (its betas and
    prediction_type), as ``DDPMScheduler.from_config(...)`` etc."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if kind not in classes:
        raise InputError(f"--scheduler: unknown scheduler {kind!r}; expected one of {', '.join(SCHEDULERS)}")
    config_file = folder / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the scheduler config {config_file}: {error}") from None
    return classes[kind].from_config(config)


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class SDComponents:
    """The loaded parts of a Stable Diffusion pipeline (unused parts may be None)."""

    folder: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any = None
    unet: Any = None
    scheduler: Any = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


def load_sd_components(model: str = DEFAULT_MODEL, dtype: str = "auto", scheduler: str = "ddpm",
                       device: str | torch.device | None = None, parts: tuple[str, ...] = PIPELINE_PARTS
                       ) -> SDComponents:
    """Load VAE, tokenizer, text encoder, UNet and scheduler of a diffusers SD pipeline.

    ``model``: Hub id or local pipeline folder. ``dtype``: auto | fp32 | fp16 | bf16 (half
    precisions only on an accelerator). ``scheduler``: ddpm | ddim | euler, built from the
    model's scheduler config. The VAE stays in fp32 when its config asks for it
    (``force_upcast``: SD VAEs overflow in fp16); ``encode`` casts its output to float32. Models are in eval mode, without grads.
    ``parts`` restricts loading (e.g. ``("tokenizer", "text_encoder")``).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unknown = set(parts) - set(PIPELINE_PARTS)
    if unknown:
        raise ValueError(f"unknown pipeline parts {sorted(unknown)}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler: unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    folder = resolve_pipeline_folder(model, parts)
    out = SDComponents(folder=folder, tokenizer=None, text_encoder=None, device=device, dtype=torch_dtype)
    if "tokenizer" in parts:
        out.tokenizer = _load_part(CLIPTokenizer, folder, "tokenizer")
    if "text_encoder" in parts:
        out.text_encoder = _load_part(CLIPTextModel, folder, "text_encoder", dtype=torch_dtype)
    if "unet" in parts:
        out.unet = _load_part(UNet2DConditionModel, folder, "unet", torch_dtype=torch_dtype)
    if "vae" in parts:
        # SD VAEs overflow in half precision; their config says so with force_upcast
        upcast = AutoencoderKL.load_config(str(folder / "vae")).get("force_upcast", False)
        out.vae = _load_part(AutoencoderKL, folder, "vae", torch_dtype=torch.float32 if upcast else torch_dtype)
    if "scheduler" in parts:
        out.scheduler = build_scheduler(folder, scheduler)
    for module in (out.text_encoder, out.unet, out.vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return out


# ----------------------------------------------------------------------------- text


class SDTextEncoder:
    """Tokenise + encode prompts as the SD pipeline does (pad to the max length, truncate)."""

    POOLINGS = ("none", "eos", "mean")

    def __init__(self, tokenizer: Any, text_encoder: Any, device: torch.device):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self._warned: set[str] = set()

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype: str = "auto",
                        device: str | torch.device | None = None) -> "SDTextEncoder":
        parts = load_sd_components(model, dtype=dtype, device=device, parts=TEXT_PARTS)
        return cls(parts.tokenizer, parts.text_encoder, parts.device)

    def _tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InputError(f"prompts must be strings, got {prompt!r}")
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        for prompt in prompts:  # the pipeline truncates silently; say so once per prompt
            if prompt not in self._warned and len(self.tokenizer(prompt).input_ids) > max_length:
                self._warned.add(prompt)
                warnings.warn(f"prompt truncated to {max_length} tokens, as Stable Diffusion does: {prompt[:60]!r}...",
                              stacklevel=3)
        return tokens

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(last hidden states (N, L, D), EOS-token states (N, D), attention mask (N, L)).

        The UNet is conditioned on the last hidden states (after CLIP's final layer norm); the
        attention mask goes to the encoder only where its config asks (``use_attention_mask``),
        as in diffusers' StableDiffusionPipeline.
        """
        tokens = self._tokens(list(prompts))
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        out = self.text_encoder(ids, attention_mask=mask if use_mask else None)
        # CLIP's pooler_output is the final state at the first EOS token (the CLIP "pooled" text feature)
        return out.last_hidden_state, out.pooler_output, mask

    def embeddings(self, prompts: list[str], pooling: str = "none") -> torch.Tensor:
        """Text embeddings as float32 on the CPU, for embedding-bias measurements.

        - "none": the last hidden states (N, L, D), what the UNet attends to (the original
          flattened these, 77 x 1024 for SD 2.1);
        - "eos": the state at the EOS token (N, D), CLIP's pooled text feature;
        - "mean": the mean of the states over the prompt's real tokens, BOS..EOS (N, D).
        """
        return self.pooled(prompts, (pooling,))[pooling]

    def pooled(self, prompts: list[str], poolings: tuple[str, ...] = POOLINGS) -> dict[str, torch.Tensor]:
        """``embeddings`` for several poolings from one text-encoder pass: pooling -> tensor."""
        unknown = [p for p in poolings if p not in self.POOLINGS]
        if unknown:
            raise InputError(f"unknown pooling {unknown[0]!r}; expected one of {', '.join(self.POOLINGS)}")
        hidden, eos, mask = self.encode(prompts)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        results = {"none": hidden, "eos": eos, "mean": (hidden * weights).sum(1) / weights.sum(1)}
        return {p: results[p].float().cpu() for p in poolings}


# ----------------------------------------------------------------------------- the score model


class StableDiffusionScoreModel(ScoreModel):
    """``ScoreModel`` over a Stable Diffusion pipeline (latent space, prompt conditions).

    ``timesteps``: ``timestep_table(scheduler, num_inference_steps)`` (the original's
    ``set_timesteps(1000)`` by default: 1000, ..., 1 with SD's steps_offset 1, so k -> t = k);
    ``alphas_cumprod``: the scheduler's (float32, CPU).
    ``encode_counts`` counts text-encoder passes per prompt (each prompt once per object).
    ``unet_batch_size`` (None = everything in one call) caps the B*K rows per UNet call.
    """

    def __init__(self, components: SDComponents, num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
                 unet_batch_size: int | None = None):
        for part in PIPELINE_PARTS:
            if getattr(components, part) is None:
                raise ValueError(f"StableDiffusionScoreModel needs the {part}")
        self.components = components
        self.device = components.device
        self.dtype = components.dtype
        self.vae = components.vae
        self.unet = components.unet
        self.scheduler = components.scheduler
        self.text = SDTextEncoder(components.tokenizer, components.text_encoder, components.device)
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"{components.folder}: scheduler prediction_type {self.prediction_type!r} is not "
                             f"supported; expected one of {', '.join(PREDICTION_TYPES)}")
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = timestep_table(self.scheduler, self.num_inference_steps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.detach().float().cpu()
        self.unet_batch_size = unet_batch_size
        self.encode_counts: collections.Counter[str] = collections.Counter()
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype: str = "auto", scheduler: str = "ddpm",
                        device: str | torch.device | None = None,
                        num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
                        unet_batch_size: int | None = None) -> "StableDiffusionScoreModel":
        """Load ``model`` (Hub id or folder); see ``load_sd_components`` and ``timestep_table``."""
        components = load_sd_components(model, dtype=dtype, scheduler=scheduler, device=device)
        return cls(components, num_inference_steps=num_inference_steps, unet_batch_size=unet_batch_size)

    def identity(self) -> dict:
        """The pipeline folder (for a Hub id, the cache snapshot, whose name is the revision),
        the scheduler class and the precision: what the noise predictions depend on."""
        return {"family": "stable-diffusion", "folder": str(Path(self.components.folder).resolve()),
                "scheduler": type(self.scheduler).__name__, "dtype": str(self.dtype).replace("torch.", "")}

    # -- images -> latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """x0 = scaling_factor * (E(2 * images - 1).mean - shift_factor), float32 on ``device``.

        images: (B, 3, H, W) in [0, 1] with H, W multiples of the VAE's downsampling factor.
        The posterior mean (not a sample) makes x0 a deterministic function of the image.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.vae_scale or width % self.vae_scale:
            raise InputError(f"image size {height}x{width} is not a multiple of the VAE's factor {self.vae_scale}")
        low, high = float(images.min()), float(images.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise InputError(f"images must lie in [0, 1]; got values in [{low:.3f}, {high:.3f}]")
        pixels = (images.to(self.device, self.vae.dtype) * 2 - 1)
        mean = self.vae.encode(pixels).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((mean - shift) * self.vae.config.scaling_factor).float()

    # -- prompts -> cached embeddings
    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(K, L, D) UNet conditioning of ``prompts``; new prompts are encoded in one batch."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if new:
            hidden, _, _ = self.text.encode(new)
            for prompt, state in zip(new, hidden):
                self._prompt_cache[prompt] = state.to(self.dtype)
                self.encode_counts[prompt] += 1
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def text_embeddings(self, prompts: list[str], pooling: str = "none") -> torch.Tensor:
        """See ``SDTextEncoder.embeddings`` (float32 CPU; not cached, not counted)."""
        return self.text.embeddings(prompts, pooling)

    # -- the noise predictions
    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, conditions: list[str]) -> torch.Tensor:
        """epsilon(x_t, t, c_k) for every condition, shape (B, K, C, h, w), float32.

        x_t is the variance-preserving noisy latent of ``add_noise``; it is the UNet's input
        for every scheduler. (Euler's ``scale_model_input`` divides its own sample
        x0 + sigma eps by sqrt(sigma^2 + 1); with sigma^2 = (1 - abar) / abar that sample
        scaled is exactly this x_t, so no scaling is applied here; a test checks the identity.
        The scheduler's method is not called because it keeps a step index from its first
        call and takes one timestep per batch.)
        The output is converted with ``to_epsilon`` from the scheduler's prediction_type.
        """
        conditions = list(conditions)
        if not conditions:
            raise InputError("predict_eps needs at least one condition (prompt)")
        if x_t.ndim != 4:
            raise InputError(f"x_t must be (B, C, h, w) latents, got shape {tuple(x_t.shape)}")
        batch, k = x_t.shape[0], len(conditions)
        t = torch.as_tensor(t, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise InputError(f"predict_eps: {t.numel()} timesteps for a batch of {batch} (give one, or one per image)")
        t = t.reshape(batch)
        n_train = len(self.alphas_cumprod)
        if int(t.min()) < 0 or int(t.max()) >= n_train:
            raise InputError(f"timesteps must lie in 0..{n_train - 1}, got {t.tolist()}")
        x_t = x_t.to(self.device).float()
        t = t.to(self.device)
        embeddings = self.prompt_embeddings(conditions)  # (K, L, D)
        # row b * K + j = image b under prompt j
        rows_x = x_t.repeat_interleave(k, dim=0).to(self.dtype)
        rows_t = t.repeat_interleave(k)
        rows_c = embeddings.repeat(batch, 1, 1)
        step = self.unet_batch_size or rows_x.shape[0]
        outputs = [self.unet(rows_x[i:i + step], rows_t[i:i + step], encoder_hidden_states=rows_c[i:i + step]).sample
                   for i in range(0, rows_x.shape[0], step)]
        output = torch.cat(outputs).float().reshape(batch, k, *x_t.shape[1:])
        return to_epsilon(output, x_t, t, self.alphas_cumprod, self.prediction_type)
