"""A second, independent instrument for the portraits' attributes: a small CNN trained on the
renders' ground truth.

The attribute rules of portraits.py are hand-made colour and geometry tests; they are exact
on clean renders, but generated samples are not clean renders. This classifier learns hair
length (short / long) and scene (neutral / hospital / library) from the training renders
and their ground-truth attributes (the dataset's manifest.jsonl), with augmentations that
imitate a sampler's artefacts (blur, noise, colour and light jitter), so that where the
rule and the classifier disagree on a sample, one of them is wrong and the images are
worth a look (the audit draws a grid of them).

A call is "unclear" when the classifier's top probability is below ``CONFIDENT`` (hybrids
of two scenes, for instance). The classifier is trained once per dataset and image size,
deterministically (seeded, one CPU thread's worth of work: about a minute), and cached in
``<dataset root>/attribute_classifier/<size>/`` as safetensors + JSON; its held-out
accuracy on the test renders is recorded there and must reach ``MIN_TEST_ACCURACY``.
"""
from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from bias_begets_bias.cli import InputError
from bias_begets_bias.portraits import HAIR_LENGTHS, SCENES
from bias_begets_bias.utils import atomic_write_bytes, atomic_write_json

CONFIDENT = 0.9  # below this top probability a call is "unclear"
MIN_TEST_ACCURACY = 0.99  # on the held-out test renders, per attribute
EPOCHS = 4
BATCH_SIZE = 128
LR = 3e-3
SEED = 0
_FORMAT = 1  # bump when the network or its training changes


class AttributeNet(nn.Module):
    """Four strided 3x3 convolutions, global average pooling, two linear heads (hair, scene)."""

    def __init__(self, width: int = 24):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2 if channels != 3 else 1, padding=1), nn.GroupNorm(4, out),
                       nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.hair = nn.Linear(channels, len(HAIR_LENGTHS))
        self.scene = nn.Linear(channels, len(SCENES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.hair(pooled), self.scene(pooled)


def _to_input(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, light and colour jitter, a random blur and Gaussian noise, per image."""
    n = len(x)
    flips = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 2)
    x = x + 0.08 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 2
    blur = torch.rand(n, generator=generator) < 0.5
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(blur[:, None, None, None], blurred, x)
    x = x + torch.randn(x.shape, generator=generator) * 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    return x.clamp(-1.5, 1.5)


def _labelled_split(dataset: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, S, S) of one split with ground-truth hair and scene indices, from the manifest."""
    from PIL import Image

    manifest = dataset.parent / "manifest.jsonl"
    try:
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise InputError(f"{manifest}: cannot read the dataset manifest ({error}); the attribute classifier "
                         f"needs the renders' ground truth") from None
    images, hair, scene = [], [], []
    for row in rows:
        attributes, files = row.get("attributes"), row.get("files", {})
        if row.get("split") != split or not attributes or str(size) not in files:
            continue
        path = dataset.parent / files[str(size)]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError:
            raise InputError(f"corrupt or unreadable image: {path}") from None
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        hair.append(HAIR_LENGTHS.index(attributes["hair"]))
        scene.append(SCENES.index(attributes["scene"]))
    if not images:
        raise InputError(f"{manifest}: no procedural {split} images of size {size} with ground-truth attributes")
    return torch.stack(images), torch.tensor(hair), torch.tensor(scene)


def _fingerprint(dataset: Path) -> int:
    return zlib.crc32((dataset.parent / "manifest.jsonl").read_bytes())


class AttributeClassifier:
    """The trained instrument: ``calls(images_u8)`` -> [{"hair": ..., "scene": ...}] like the rules."""

    def __init__(self, net: AttributeNet, info: dict):
        self.net = net.eval()
        self.info = info

    @torch.no_grad()
    def probabilities(self, images_u8: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        hair, scene = [], []
        for start in range(0, len(images_u8), batch_size):
            h, s = self.net(_to_input(images_u8[start:start + batch_size]))
            hair.append(h.softmax(-1))
            scene.append(s.softmax(-1))
        return torch.cat(hair), torch.cat(scene)

    def calls(self, images_u8: torch.Tensor) -> list[dict[str, str]]:
        """Hair (short / long / unclear) and scene (neutral / hospital / library / unclear) per image."""
        hair, scene = self.probabilities(images_u8)

        def call(probs: torch.Tensor, names: tuple[str, ...]) -> list[str]:
            top, index = probs.max(-1)
            return [names[i] if p >= CONFIDENT else "unclear" for p, i in zip(top.tolist(), index.tolist())]

        return [{"hair": h, "scene": s} for h, s in zip(call(hair, HAIR_LENGTHS), call(scene, SCENES))]


def train_classifier(dataset: Path, size: int, progress: bool = True) -> AttributeClassifier:
    """Train on the train split's renders (seeded, deterministic) and measure the test split."""
    from bias_begets_bias.utils import progress_bar

    torch.manual_seed(SEED)
    images, hair, scene = _labelled_split(dataset, "train", size)
    net = AttributeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    steps = [(epoch, start) for epoch in range(EPOCHS) for start in range(0, len(images), BATCH_SIZE)]
    order = None
    net.train()
    for epoch, start in progress_bar(steps, desc="training the attribute classifier", disable=not progress,
                                     leave=False):
        if start == 0:
            order = torch.randperm(len(images), generator=generator)
        idx = order[start:start + BATCH_SIZE]
        x = _augment(_to_input(images[idx]), generator)
        h, s = net(x)
        loss = F.cross_entropy(h, hair[idx]) + F.cross_entropy(s, scene[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    classifier = AttributeClassifier(net, {})
    test_images, test_hair, test_scene = _labelled_split(dataset, "test", size)
    h, s = classifier.probabilities(test_images)
    classifier.info = {"format": _FORMAT, "size": size, "manifest_crc32": _fingerprint(dataset),
                       "n_train": len(images), "n_test": len(test_images),
                       "test_accuracy_hair": float((h.argmax(-1) == test_hair).float().mean()),
                       "test_accuracy_scene": float((s.argmax(-1) == test_scene).float().mean()),
                       "confident": CONFIDENT}
    return classifier


def load_or_train(dataset: Path, size: int, progress: bool = True) -> AttributeClassifier:
    """The dataset's cached classifier for ``size`` px, trained first when missing or stale.

    Raises InputError when its accuracy on the held-out test renders is below
    ``MIN_TEST_ACCURACY`` (an instrument that fails its control must not judge samples).
    """
    folder = dataset.parent / "attribute_classifier" / str(size)
    weights, info_path = folder / "weights.safetensors", folder / "info.json"
    classifier = None
    if weights.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if info.get("format") == _FORMAT and info.get("manifest_crc32") == _fingerprint(dataset):
                net = AttributeNet()
                net.load_state_dict(load_file(str(weights)))
                classifier = AttributeClassifier(net, info)
        except (OSError, ValueError, SafetensorError, RuntimeError, AttributeError):
            classifier = None  # a damaged cache is simply trained again
    if classifier is None:
        classifier = train_classifier(dataset, size, progress)
        try:
            atomic_write_bytes(weights, safetensors_bytes({k: v.contiguous()
                                                           for k, v in classifier.net.state_dict().items()}))
            atomic_write_json(info_path, classifier.info)
        except OSError as error:  # a read-only (shared) dataset: the classifier is used without its cache
            print(f"note: cannot cache the attribute classifier in {folder} ({error.strerror or error}); it will be "
                  f"trained again next time", file=sys.stderr)
    worst = min(classifier.info["test_accuracy_hair"], classifier.info["test_accuracy_scene"])
    if worst < MIN_TEST_ACCURACY:
        raise InputError(f"{folder}: the attribute classifier reaches only {worst:.3f} accuracy on the test renders "
                         f"(needs {MIN_TEST_ACCURACY}); it cannot serve as a check")
    return classifier


__all__ = ["AttributeClassifier", "load_or_train", "train_classifier", "CONFIDENT"]
