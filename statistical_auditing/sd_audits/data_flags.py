"""Data-source flags shared by fairface.py, diffusion_classifier.py and diff_prompts_same_score.py.

Each script imports the constants it uses at its top (``from statistical_auditing.sd_audits.data_flags
import DATA, KIND, ...``); ``bias_begets_bias.cli.constants_of(globals())`` turns them
into flags of the same name in lower case, like the script's own constants. A script whose
default differs keeps its own constant instead. ``cli_common.open_data`` reads them.
"""
from statistical_auditing.core.labelled_images import FAIRFACE_HUB_ID, KINDS

DATA = FAIRFACE_HUB_ID  # HF dataset id or save_to_disk folder, FairFace CSV, label CSV, or six-class dataset root
KIND = "auto"  # data kind: auto | hf | fairface_csv | csv | sixclass
ATTRIBUTE = "gender"  # label: gender | race (FairFace) | class (six-class data) | a column (see --label_column)
DATA_CONFIG = "0.25"  # Hugging Face dataset config (FairFace: 0.25, the original's, or 1.25; "" = none, e.g. CIFAR-10)
SPLIT = ""  # dataset split ("" = train for Hugging Face datasets, as the original; test for six-class data)
IMAGES_ROOT = ""  # CSV kinds: folder the CSV's file paths are relative to ("" = the CSV's folder)
LABEL_COLUMN = ""  # csv and hf kinds: label column, ClassLabel names or strings ("" = --attribute)
IMAGE_COLUMN = "image"  # hf kind: image column (FairFace: image; CIFAR-10 on the Hub: img)
SIZE = ""  # six-class data: the <size> folder under the root ("" = the only one)
SKIP_BAD = False  # skip unreadable images (noted on stderr) instead of stopping
SELECTION = "random"  # which images: random (a shuffle seeded by --seed; the original shuffled) | first (data order)
RESIZE = -1  # [-1, inf) square side (-1 = family default: 224 for SD, the original's size; a pixel run's own size; 0 = keep)
CLASSES = ""  # class labels the candidates stand for, in order ("" = the dataset's class order)
TEMPLATE = ""  # prompts from the class names, e.g. "a blurry photo of a {class}." (the original's CIFAR-10); "" = off

DATA_CHOICES = {"kind": KINDS, "selection": ("random", "first")}
