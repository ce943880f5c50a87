"""kd: knowledge distillation for PyTorch (ASMB multi-teacher distillation and exact baselines).

Self-contained: imports only torch, torchvision, timm, einops (plus numpy/PIL), so the folder can be
copied into other research code.
"""

__version__ = "0.1.0"
