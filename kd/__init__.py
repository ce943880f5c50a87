"""kd: knowledge distillation for PyTorch (ASMB multi-teacher distillation and exact baselines).

Self-contained: imports only torch, torchvision, timm, einops (plus numpy/PIL), so the folder can be
copied into other research code. `import kd` registers the CIFAR model zoo (kd.zoo) with timm.
"""

__version__ = "0.1.0"

from . import zoo  # noqa: E402,F401  (registers the CIFAR KD zoo with timm: `import kd` is enough)
