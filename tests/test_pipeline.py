import pytest
import torch

from diffusion_from_scratch.modules import ConditionalUNet, UNetConfig
from diffusion_from_scratch.pipeline import SAMPLERS, sample, sampling_scheduler, train_scheduler


def tiny_unet() -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(UNetConfig(image_size=8, widths=(4, 8, 8, 8), bottleneck=8, attention=(0,) * 6,
                                      norm_groups=1)).eval()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_in_several_batches_equals_one_batch_per_call(sampler):
    """Every batch starts the sampler afresh (multistep solvers keep state between steps)."""
    model, words = tiny_unet(), torch.randn(4, 128)
    train = train_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    together = sample(model, words, sampling_scheduler(train, sampler, 5), 2.0, torch.Generator().manual_seed(3),
                      batch_size=2)
    generator = torch.Generator().manual_seed(3)
    apart = torch.cat([sample(model, words[i:i + 2], sampling_scheduler(train, sampler, 5), 2.0, generator)
                       for i in (0, 2)])
    assert together.shape == (4, 3, 8, 8) and together.dtype == torch.uint8
    assert torch.equal(together, apart)
