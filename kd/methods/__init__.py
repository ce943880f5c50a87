"""Single-stage training methods with the uniform API of `base.Method`.

Each method is one file holding its config dataclass (its `--<method>.*` CLI group) and its
`Method` subclass; the math lives in kd/losses.py. Register new methods in `METHODS`. A config
may define `check()`, raising ConfigError on bad values; train.py's validate() calls it before any work.
"""

from __future__ import annotations

from .base import Method, StepInputs, teacher_logits, weighted_loss
from .aekd import AEKD, AEKDCfg
from .at import AT, ATCfg
from .aver import Aver, AverCfg
from .camkd import CAMKD, CAMKDCfg
from .ce import CE
from .crd import CRD, CRDCfg
from .dist import DIST, DISTCfg
from .dkd import DKD, DKDCfg
from .ebkd import EBKD, EBKDCfg
from .fitnet import FitNet, FitNetCfg
from .kd import KD, KDCfg
from .pkt import PKT, PKTCfg
from .rkd import RKD, RKDCfg
from .sp import SP, SPCfg

# name -> (Method subclass, its config dataclass or None)
METHODS: dict[str, tuple[type[Method], type]] = {
    "ce": (CE, None),
    "kd": (KD, KDCfg),
    "fitnet": (FitNet, FitNetCfg),
    "at": (AT, ATCfg),
    "dkd": (DKD, DKDCfg),
    "crd": (CRD, CRDCfg),
    "rkd": (RKD, RKDCfg),
    "pkt": (PKT, PKTCfg),
    "sp": (SP, SPCfg),
    "dist": (DIST, DISTCfg),
    # multi-teacher (Method.multi_teacher: every --teachers model, >= 2)
    "aver": (Aver, AverCfg),
    "camkd": (CAMKD, CAMKDCfg),
    "ebkd": (EBKD, EBKDCfg),
    "aekd": (AEKD, AEKDCfg),
}

__all__ = ["METHODS", "Method", "StepInputs", "teacher_logits", "weighted_loss", "AEKDCfg", "ATCfg", "AverCfg",
           "CAMKDCfg", "CRDCfg", "DISTCfg", "DKDCfg", "EBKDCfg", "FitNetCfg", "KDCfg", "PKTCfg", "RKDCfg", "SPCfg"]
