"""Tiny random-weight Stable Diffusion and CLIP models, built offline and saved to disk.

They go through the same ``from_pretrained(folder)`` path a user's real model takes, so
the loading code is tested without any download. Weights are seeded, hence reproducible;
they are random, so nothing here says anything about what a real model predicts.

The tokenizer is a byte-level BPE built here: the two CLIP special tokens, the 256
byte symbols (GPT-2's byte -> printable unicode map) with and without CLIP's end-of-word
suffix ``</w>``, plus merges that spell out the words of the project's prompts, so any
text tokenises (unknown words fall back to byte symbols).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length, so truncation behaves as with a real tokenizer
# Words that get whole-word tokens (the rest of any text is spelt byte by byte).
WORDS = ("a", "photo", "of", "man", "woman", "person", "face", "nurse", "philosopher",
         "male", "female", "the", "an", "image", "realistic", "doctor", "engineer", "teacher")


def byte_symbols() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:  # unprintable bytes go to code points 256, 257, ... in byte order
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt (+ tokenizer config) of a tiny CLIP BPE tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in byte_symbols():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                merges.append(f"{current} {piece}")
                vocab[merged] = len(vocab)
            current = merged
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_clip_tokenizer():
    """The tiny tokenizer, loaded through ``CLIPTokenizer.from_pretrained`` from its files."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(folder)))


def _text_config(tokenizer, hidden_size: int = 16, projection_dim: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32,
                          projection_dim=projection_dim, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_tiny_sd_pipeline(path: str | Path, prediction_type: str = "epsilon", sample_size: int = 8,
                          seed: int = 0) -> Path:
    """Save a tiny random StableDiffusionPipeline (latents 4 x sample_size^2, images 2x that).

    Same seed -> same weights whatever ``prediction_type`` (only the scheduler config differs).
    The scheduler config mirrors SD 2.1's (scaled_linear betas, steps_offset 1).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4, use_linear_projection=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def save_tiny_clip_model(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random CLIPModel + CLIPProcessor (the tokenizer above, a CLIPImageProcessor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=_text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16)
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def save_tiny_fairface_csv(folder: str | Path, n: int = 4) -> Path:
    """The original FairFace layout: fairface_label_train.csv (file,age,gender,race,service_test)
    beside train/<i>.jpg; genders alternate Male, Female; images 20x24 (not square), seeded."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    csv_path = folder / "fairface_label_train.csv"
    (folder / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["file,age,gender,race,service_test"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "train" / f"{i}.jpg")
        lines.append(f"train/{i}.jpg,20-29,{'Male' if i % 2 == 0 else 'Female'},White,True")
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


# How many images each generator made per profession in the StableBias-layout fixture: gen-a made 4
# nurses, 3 doctors, 2 teachers (fewer than a smoke N = 3), 3 engineers, no philosopher; gen-b made
# more of each, which a --generator gen-a filter must drop.
STABLE_BIAS_MADE = {"gen-a": {"nurse": 4, "doctor": 3, "teacher": 2, "engineer": 3},
                    "gen-b": {"nurse": 2, "teacher": 5, "philosopher": 4}}


def save_tiny_stable_bias(root: str | Path) -> Path:
    """A professions dataset in the StableBias layout (profession, model, no, seed, image), saved
    with ``save_to_disk`` to <root>/professions, and <root>/professions.txt; seeded 16 px images."""
    import datasets
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    rows = {"profession": [], "model": [], "no": [], "seed": [], "image": []}
    for generator, counts in STABLE_BIAS_MADE.items():
        for profession, count in counts.items():
            for number in range(count):
                rows["profession"].append(profession)
                rows["model"].append(generator)
                rows["no"].append(number)
                rows["seed"].append(int(rng.integers(1 << 30)))
                rows["image"].append(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    features = datasets.Features({"profession": datasets.Value("string"), "model": datasets.Value("string"),
                                  "no": datasets.Value("int32"), "seed": datasets.Value("int32"),
                                  "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "professions"))
    (root / "professions.txt").write_text("nurse\ndoctor\nteacher\nengineer\nphilosopher\n")
    return root / "professions"
