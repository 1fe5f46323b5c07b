"""Stable Diffusion loading and its ScoreModel, on tiny random pipelines saved to tmp folders."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny_sd_pipeline  # noqa: E402

from bias_begets_bias.cli import InputError  # noqa: E402
from statistical_auditing.core.score_models import to_epsilon  # noqa: E402
from statistical_auditing.sd_audits.sd_models import (  # noqa: E402
    SDTextEncoder,
    StableDiffusionScoreModel,
    build_scheduler,
    load_sd_components,
)
from bias_begets_bias.hub import resolve_dtype  # noqa: E402

PROMPTS = ["photo of a person's face", "photo of a person's face, man", "photo of a person's face, woman"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {"eps": save_tiny_sd_pipeline(root / "eps", "epsilon"),
            "v": save_tiny_sd_pipeline(root / "v", "v_prediction")}


@pytest.fixture(scope="module")
def model(pipelines):
    return StableDiffusionScoreModel.from_pretrained(str(pipelines["eps"]), dtype="fp32", device="cpu")


def noisy_latents(model, k=5, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 16, 16, generator=generator)
    x0 = model.encode(images)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.full((batch,), model.timestep_for_k(k), dtype=torch.long)
    return model.add_noise(x0, noise, t), t


def test_tiny_pipeline_loads_in_fp32_on_cpu(model):
    assert model.device.type == "cpu"
    assert model.unet.dtype == torch.float32 and model.vae.dtype == torch.float32
    assert model.prediction_type == "epsilon"
    x_t, t = noisy_latents(model)
    assert x_t.shape == (2, 4, 8, 8)
    eps = model.predict_eps(x_t, t, PROMPTS)
    assert eps.shape == (2, 3, 4, 8, 8) and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()


def test_half_precision_is_refused_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(InputError, match="accelerator"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_to_epsilon_by_hand_for_each_prediction_type():
    # abar = 0.64: sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6; x0 = 1, eps = 2
    # x_t = 0.8 + 1.2 = 2.0; v = 0.8 * 2 - 0.6 * 1 = 1.0; eps = 0.8 * v + 0.6 * x_t = 2.0
    abar = torch.tensor([0.5, 0.64])
    x_t, t = torch.tensor([[2.0]]), torch.tensor([1])
    assert torch.equal(to_epsilon(torch.tensor([[2.0]]), x_t, t, abar, "epsilon"), torch.tensor([[2.0]]))
    assert torch.allclose(to_epsilon(torch.tensor([[1.0]]), x_t, t, abar, "v_prediction"), torch.tensor([[2.0]]))
    # x0-prediction 1.0 implies eps = (2.0 - 0.8) / 0.6 = 2.0
    assert torch.allclose(to_epsilon(torch.tensor([[1.0]]), x_t, t, abar, "sample"), torch.tensor([[2.0]]))
    # (B, K) outputs against a (B,) x_t: each candidate column converted with its image's x_t and t.
    # image 0 at t = 0 (abar 0.5, sqrt = 0.70711), x_t = 1: v = 1 -> 0.70711 + 0.70711 = 1.41421, v = 0 -> 0.70711
    out = to_epsilon(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), abar,
                     "v_prediction")
    assert torch.allclose(out, torch.tensor([[1.41421, 0.70711], [2.0, 1.2]]), atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(torch.tensor([[1.0]]), x_t, t, abar, "flow")


def test_eps_to_v_and_back_is_identity():
    """Whatever the model predicts, the solver sees the same epsilon."""
    generator = torch.Generator().manual_seed(1)
    abar = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([3, 500, 990])
    x_t = torch.randn(3, 4, 2, 2, generator=generator)
    eps = torch.randn(3, 2, 4, 2, 2, generator=generator)  # (B, K, ...) candidates
    a = abar[t].reshape(3, 1, 1, 1, 1)
    x0 = (x_t.unsqueeze(1) - (1 - a).sqrt() * eps) / a.sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(to_epsilon(v, x_t, t, abar, "v_prediction"), eps, atol=1e-4)
    assert torch.allclose(to_epsilon(x0, x_t, t, abar, "sample"), eps, atol=1e-3)


def test_v_prediction_config_matches_diffusers_own_reading_of_v(pipelines, model):
    """Same weights, v config: the raw UNet output read as v. diffusers' DDPMScheduler.step reads
    it as x0_hat (its pred_original_sample); the epsilon we return must close the forward
    process with it: x_t = sqrt(abar) x0_hat + sqrt(1 - abar) eps."""
    v_model = StableDiffusionScoreModel.from_pretrained(str(pipelines["v"]), dtype="fp32", device="cpu")
    assert v_model.prediction_type == "v_prediction"
    x_t, t = noisy_latents(model, k=300)
    raw = model.predict_eps(x_t, t, PROMPTS[:1])[:, 0]  # the epsilon config returns the raw UNet output
    converted = v_model.predict_eps(x_t, t, PROMPTS[:1])[:, 0]
    x0_hat = v_model.scheduler.step(raw[:1], int(t[0]), x_t[:1]).pred_original_sample
    abar = float(v_model.alphas_cumprod[t[0]])
    assert torch.allclose(abar ** 0.5 * x0_hat + (1 - abar) ** 0.5 * converted[:1], x_t[:1], atol=1e-5)
    assert not torch.allclose(converted, raw, atol=1e-3)


def test_k_to_timestep_is_the_originals(model):
    """set_timesteps(1000) with SD's steps_offset 1 ("leading"): the table is 1000, ..., 1, so
    k = 5 is t = 5 (as the original's timesteps[-5]); k = 1000 would be t = 1000, past the
    training timesteps 0..999, and is refused."""
    assert model.num_inference_steps == 1000 and len(model.timesteps) == 1000
    assert [model.timestep_for_k(k) for k in (1, 5, 20, 999)] == [1, 5, 20, 999]
    with pytest.raises(InputError, match=r"^k=1000 is outside the timestep table: expected 1 <= k <= 999 "
                                         r"\(timesteps\[-1000\] = 1000"):
        model.timestep_for_k(1000)
    for k in (0, 1001):
        with pytest.raises(InputError, match=f"k={k} is outside the timestep table: expected 1 <= k <= 999"):
            model.timestep_for_k(k)
    # the heat-map script's --num_timesteps 100: k -> t = 10k - 9
    hundred = StableDiffusionScoreModel(model.components, num_inference_steps=100)
    assert [hundred.timestep_for_k(k) for k in (1, 2, 5, 100)] == [1, 11, 41, 991]
    with pytest.raises(InputError, match="num_inference_steps"):
        StableDiffusionScoreModel(model.components, num_inference_steps=5000)


def test_each_scheduler_takes_the_pipelines_spacing_and_offset(pipelines):
    """Every --scheduler is built from the pipeline's scheduler config, here SD's "leading"
    spacing with steps_offset 1 (as a diffusers save writes it): at the original's 1000 steps
    the table is 1000, ..., 1 for DDPM, DDIM and Euler, at 100 steps 991, 981, ..., 1.
    (Euler's own "linspace" default, e.g. for SD 2.1's config, is checked in test_score_interface.py.)"""
    config = json.loads((Path(pipelines["eps"]) / "scheduler" / "scheduler_config.json").read_text())
    assert (config["steps_offset"], config["timestep_spacing"]) == (1, "leading")
    for kind in ("ddpm", "ddim", "euler"):
        for n, expected in ((1000, list(range(1000, 0, -1))), (100, list(range(991, 0, -10)))):
            loaded = StableDiffusionScoreModel.from_pretrained(str(pipelines["eps"]), dtype="fp32", device="cpu",
                                                               scheduler=kind, num_inference_steps=n)
            assert loaded.timesteps.dtype == torch.long and loaded.timesteps.tolist() == expected, (kind, n)


def test_each_prompt_is_encoded_once(model):
    model.encode_counts.clear()
    model._prompt_cache.clear()
    x_t, t = noisy_latents(model)
    model.predict_eps(x_t, t, PROMPTS)
    model.predict_eps(x_t, t, PROMPTS[1:])
    model.predict_eps(x_t, t, [PROMPTS[0], "", PROMPTS[0]])
    assert dict(model.encode_counts) == {p: 1 for p in PROMPTS + [""]}


def test_batched_candidates_match_single_calls(model):
    x_t, t = noisy_latents(model, batch=3)
    together = model.predict_eps(x_t, t, PROMPTS)
    for j, prompt in enumerate(PROMPTS):
        alone = model.predict_eps(x_t[1:2], t[1:2], [prompt])
        assert torch.allclose(together[1, j], alone[0, 0], atol=1e-5)
    # prompts must matter for a conditioned UNet (guards against broadcasting one embedding)
    assert not torch.allclose(together[:, 1], together[:, 2], atol=1e-6)
    chunked = StableDiffusionScoreModel(model.components, unet_batch_size=2)
    assert torch.allclose(chunked.predict_eps(x_t, t, PROMPTS), together, atol=1e-5)


def test_encode_is_deterministic_and_checks_range(model):
    images = torch.rand(1, 3, 16, 16)
    assert torch.equal(model.encode(images), model.encode(images))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.encode(images * 2 - 1)
    with pytest.raises(InputError, match="multiple"):
        model.encode(torch.rand(1, 3, 15, 16))


def test_euler_scale_model_input_maps_its_sample_to_our_x_t(pipelines):
    """Euler's own scaling of its sample x0 + sigma eps equals the VP x_t we feed the UNet."""
    scheduler = build_scheduler(Path(pipelines["eps"]), "euler")
    scheduler.set_timesteps(1000)
    t = 250
    abar = scheduler.alphas_cumprod[t]
    x_t = torch.randn(1, 4, 2, 2)
    euler_sample = x_t / abar.sqrt()
    scaled = scheduler.scale_model_input(euler_sample, torch.tensor(float(t)))
    assert torch.allclose(scaled, x_t, atol=1e-5)


def test_text_embeddings(model, pipelines):
    full = model.text_embeddings(PROMPTS, "none")
    eos = model.text_embeddings(PROMPTS, "eos")
    mean = model.text_embeddings(PROMPTS, "mean")
    assert full.shape == (3, 77, 16) and eos.shape == (3, 16) and mean.shape == (3, 16)
    assert full.dtype == torch.float32 and full.device.type == "cpu"
    # the EOS state is the last hidden state at the first end-of-text token
    ids = model.text.tokenizer(PROMPTS[0]).input_ids
    assert torch.allclose(eos[0], full[0, len(ids) - 1], atol=1e-5)
    text_only = SDTextEncoder.from_pretrained(str(pipelines["eps"]), dtype="fp32", device="cpu")
    assert torch.allclose(text_only.embeddings(PROMPTS, "eos"), eos, atol=1e-6)
    with pytest.raises(InputError, match="pooling"):
        model.text_embeddings(PROMPTS, "max")


def test_unknown_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as info:
        load_sd_components("nobody-here/no-such-model-xyz", dtype="fp32", device="cpu")
    message = str(info.value)
    assert "nobody-here/no-such-model-xyz" in message and "download" in message and "folder" in message


def test_folder_that_is_not_a_pipeline(tmp_path, pipelines):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="model_index.json") as info:
        load_sd_components(str(empty), dtype="fp32", device="cpu")
    assert str(empty) in str(info.value)
    partial = tmp_path / "partial"
    shutil.copytree(pipelines["eps"], partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(InputError, match="unet"):
        load_sd_components(str(partial), dtype="fp32", device="cpu")
    with pytest.raises(InputError, match="no such folder"):
        load_sd_components(str(tmp_path / "nowhere" / "x"), dtype="fp32", device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(pipelines["eps"], broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="unet"):
        load_sd_components(str(broken), dtype="fp32", device="cpu")


def test_unknown_scheduler_and_prediction_type(tmp_path, pipelines):
    with pytest.raises(InputError, match="scheduler"):
        load_sd_components(str(pipelines["eps"]), dtype="fp32", device="cpu", scheduler="pndm")
    odd = tmp_path / "odd"
    shutil.copytree(pipelines["eps"], odd)
    config_file = odd / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "flow"
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match="prediction_type"):
        StableDiffusionScoreModel.from_pretrained(str(odd), dtype="fp32", device="cpu")
