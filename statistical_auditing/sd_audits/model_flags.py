"""Model flags shared by fairface.py, diffusion_classifier.py and diff_prompts_same_score.py
(imported at each script's top, as data_flags.py; ``cli_common.load_model`` reads them)."""
from statistical_auditing.core.score_interface import DEFAULT_INFERENCE_STEPS
from bias_begets_bias.hub import DEFAULT_MODEL, DTYPES
from statistical_auditing.sd_audits.sd_models import SCHEDULERS

MODEL = DEFAULT_MODEL  # from-scratch run folder, or Stable Diffusion hub id / pipeline folder
DEVICE = ""  # torch device ("" = the accelerator if available, else cpu)
DTYPE = "auto"  # Stable Diffusion only: auto | fp32 | fp16 | bf16
SCHEDULER = "ddpm"  # Stable Diffusion only: ddpm | ddim | euler (built from the model's scheduler config)
NUM_INFERENCE_STEPS = DEFAULT_INFERENCE_STEPS  # [1, inf) set_timesteps(n), then t = timesteps[-k] (the original: 1000)

MODEL_CHOICES = {"dtype": ("auto", *DTYPES), "scheduler": SCHEDULERS}
