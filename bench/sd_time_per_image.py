"""Benchmark: Stable Diffusion time per image of ScoreDecomp and of the ELBO classifier.

Run time does not depend on weight values, so this bench needs no download: it builds
Stable Diffusion 2.1's architecture (UNet 865M, VAE, OpenCLIP-H text encoder; the shapes
of the published ``stabilityai/stable-diffusion-2-1`` config.json files, copied below as
constants) with random weights, wraps it in the same ``StableDiffusionScoreModel`` the
scripts load real pipelines into, and times what ``fairface.py`` does per image:

- ScoreDecomp: VAE encode, then one UNet call over [base] + K candidates (1 + K
  evaluations per image), then the simplex solve;
- the ELBO classifier (Li et al. 2023): K evaluations per timestep. ``--elbo_timed``
  timesteps are run and timed; the time at the full budget (``--elbo_samples``, fairface.py's
  default 100) is that time scaled by budget / timed (every timestep is one identical UNet
  call), printed as an extrapolation.

It prints seconds per image for both, the ratio ELBO / ScoreDecomp measured in the same run,
and the FLOPs of one UNet evaluation (``torch.utils.flop_counter``), so that a time on other
hardware can be estimated. On a GPU (``--device cuda``, fp16 by default there) it gives the
GPU numbers the same way. The tokenizer is the tests' tiny BPE: prompts still pad to 77
tokens, so the text encoder does the same work.

    python bench/sd_time_per_image.py                      # 224 px (fairface.py's default), CPU fp32
    python bench/sd_time_per_image.py --resolution 768 --images 1
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bias_begets_bias.cli import config_from_constants, constants_of, require, run_main
from bias_begets_bias.utils import REPO_ROOT, atomic_write_text, csv_text
from statistical_auditing.core.elbo import elbo_classify
from statistical_auditing.sd_audits import cli_common
from statistical_auditing.core.scoring import batch_noise, scoredecomp_scores
from bias_begets_bias.hub import resolve_device, resolve_dtype
from statistical_auditing.sd_audits.sd_models import SDComponents, StableDiffusionScoreModel

RESOLUTION = cli_common.SD_RESIZE  # [1, inf) image side in pixels (fairface.py's SD default: 224, the original's; SD 2.1: 768)
IMAGES = 2  # [1, inf) images timed per method (one at a time, as a batch of 1)
BATCH_SIZE = 1  # [1, inf) images per UNet call
K = 5  # [1, inf) ScoreDecomp's k (the timestep only changes the noise level, not the cost)
ELBO_SAMPLES = 100  # [1, inf) the ELBO budget reported (timesteps per image; fairface.py's default)
ELBO_TIMED = 2  # [1, inf) ELBO timesteps actually run and timed per image
WARMUP = 1  # [0, inf) untimed passes first (allocator, kernel caches)
THREADS = 0  # [0, inf) torch CPU threads (0 = torch's default)
DEVICE = ""  # torch device ("" = the accelerator if available, else cpu)
DTYPE = "auto"  # auto (fp16 on an accelerator, fp32 on cpu) | fp32 | fp16 | bf16
SEED = 0  # [0, 2**63) weights, images and noise
OUT = "bench/results/sd_time_per_image.csv"  # results (git-ignored)

# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1): unet/, vae/, text_encoder/ and scheduler/ config.json.
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), sample_size=768,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 max_position_embeddings=77, projection_dim=512, hidden_act="gelu", layer_norm_eps=1e-5)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1, prediction_type="v_prediction")


def sd21_random(device: torch.device, dtype: torch.dtype, seed: int) -> StableDiffusionScoreModel:
    """SD 2.1's architecture with seeded random weights, as a StableDiffusionScoreModel."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_models import tiny_clip_tokenizer  # a tokenizer needs no download; the sequence is still 77 long

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **SD21_TEXT))
    unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)
    for module, module_dtype in ((text, dtype), (unet, dtype), (vae, torch.float32)):  # SD VAEs run in fp32
        module.to(device).eval().requires_grad_(False)
        if module_dtype != torch.float32:  # built in fp32; casting a float32 model warns needlessly
            module.to(module_dtype)
    components = SDComponents(folder=Path("<stable-diffusion-2-1 architecture, random weights>"),
                              tokenizer=tokenizer, text_encoder=text, vae=vae, unet=unet,
                              scheduler=DDPMScheduler(**SD21_SCHEDULER), device=device, dtype=dtype)
    return StableDiffusionScoreModel(components)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = config_from_constants(constants_of(globals()), None, argv, description=__doc__.splitlines()[0],
                                choices={"dtype": ("auto", "fp32", "fp16", "bf16")})
    require(cfg["resolution"] > 0 and cfg["resolution"] % 8 == 0,
            f"--resolution: expected a positive multiple of 8, got {cfg['resolution']}")
    require(cfg["elbo_timed"] <= cfg["elbo_samples"], "--elbo_timed: must not exceed --elbo_samples")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"] or None)
    dtype = resolve_dtype(cfg["dtype"], device)
    started = time.perf_counter()
    model = sd21_random(device, dtype, cfg["seed"])
    build_seconds = time.perf_counter() - started
    unet_params = sum(p.numel() for p in model.unet.parameters())
    base, candidates = cli_common.default_conditions(model, "gender")  # fairface.py's prompts
    size, batch = cfg["resolution"], cfg["batch_size"]
    images = torch.rand(cfg["images"], 3, size, size, generator=torch.Generator().manual_seed(cfg["seed"]))
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]

    timestep = model.timestep_for_k(cfg["k"])

    def scoredecomp(x: torch.Tensor) -> None:
        x0 = model.encode(x)
        noise = batch_noise(x0.shape[1:], cfg["seed"], [f"bench/{i}" for i in range(len(x0))])
        scoredecomp_scores(model, x0, timestep, noise, base, candidates)

    def elbo(x: torch.Tensor) -> None:
        elbo_classify(model, model.encode(x), candidates, n_samples=cfg["elbo_timed"], seed=cfg["seed"])

    latent = model.encode(images[:1])
    t = torch.tensor([timestep])
    model.prompt_embeddings([base] + candidates)  # encoded once per run, like the scripts: not in the count
    with FlopCounterMode(display=False) as counter:  # one image, one condition
        model.predict_eps(latent, t, [base])
    unet_gflop = counter.get_total_flops() / 1e9
    for _ in range(cfg["warmup"]):
        scoredecomp(batches[0])
        elbo(batches[0])
    rows = []
    for method, fn, evals in (("scoredecomp", scoredecomp, 1 + len(candidates)),
                              ("elbo", elbo, len(candidates) * cfg["elbo_timed"])):
        seconds = sum(timed(lambda: fn(x), device) for x in batches) / len(images)
        scale = cfg["elbo_samples"] / cfg["elbo_timed"] if method == "elbo" else 1.0
        rows.append({"method": method, "unet_evals_per_image": int(evals * scale),
                     "seconds_per_image": seconds * scale, "measured_seconds_per_image": seconds,
                     "extrapolated": method == "elbo" and scale != 1.0})
    ratio = rows[1]["seconds_per_image"] / rows[0]["seconds_per_image"]
    common = {"resolution": size, "latent": size // 8, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "unet_parameters": unet_params,
              "unet_gflop_per_eval": round(unet_gflop, 1), "images": len(images), "batch_size": batch,
              "load_average": round(os.getloadavg()[0], 2)}
    rows = [common | row for row in rows]
    out = Path(cfg["out"])
    atomic_write_text(out, csv_text(rows, list(rows[0])))
    print(f"SD 2.1 architecture (random weights, built in {build_seconds:.0f} s): UNet {unet_params:,} parameters, "
          f"{unet_gflop:.0f} GFLOP per evaluation at {size}x{size} px ({size // 8}x{size // 8} latent); "
          f"{device}, {common['dtype']}, {common['threads']} threads, load average {common['load_average']}")
    for r in rows:
        note = (f" (measured {r['measured_seconds_per_image']:.1f} s for {cfg['elbo_timed']} timesteps, "
                f"scaled to {cfg['elbo_samples']})") if r["extrapolated"] else ""
        print(f"  {r['method']:<12} {r['unet_evals_per_image']:>4} UNet evaluations/image  "
              f"{r['seconds_per_image']:8.1f} s/image{note}")
    print(f"  ELBO / ScoreDecomp time per image: {ratio:.0f}x   (results: {out})")
    return rows


if __name__ == "__main__":
    run_main(main)
