"""The method table: every method kd trains, by name, in one place (torch-free).

Each method is one file in kd/methods/ holding its `Method` subclass (kd/methods/base.py; the math lives in
kd/losses.py), and one line below: its name, family, config dataclass (its `--<name>.*` CLI group, kept in
kd/configs.py so a CLI's --help and bad flags never wait for torch; None = no options) and where its class
lives ("module:Class", imported by `method_class` when a run starts). Everything that lists methods (the CLI's
`--method` choices and option groups, the report's families, the parametrised tests) reads this table.

    from kd.methods import METHOD_SPECS, method_class
    KD = method_class("kd")                # kd.methods.kd.KD
    METHOD_SPECS["camkd"].multi_teacher    # True: distils from every --teachers model
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from ..configs import (
    AEKDCfg,
    AsmbCfg,
    ATCfg,
    AverCfg,
    CAMKDCfg,
    CRDCfg,
    DISTCfg,
    DKDCfg,
    EBKDCfg,
    FitNetCfg,
    KDCfg,
    PKTCfg,
    RKDCfg,
    SPCfg,
)

Family = Literal["teacher", "baseline", "logit", "feature", "multi-teacher", "asmb"]


@dataclass(frozen=True)
class MethodSpec:
    """One method. `family`: teacher (stage 0 alone: fine-tune the teachers), baseline (the student alone),
    logit / feature (distils from one teacher, --teachers.select), multi-teacher (from every --teachers model,
    >= 2), asmb (train.py's staged ASMB loop, kd/asmb.py). `impl`: "module:Class" of its kd.methods.base.Method
    subclass ("" for teacher and asmb, which train.py runs itself)."""

    name: str
    family: Family
    config: type | None = None
    impl: str = ""

    @property
    def uses_teachers(self) -> bool:
        """Needs stage 0's teachers (fine-tuned or cached) before it trains."""
        return self.family != "baseline"

    @property
    def multi_teacher(self) -> bool:
        """Distils from every --teachers model (at least two), ignoring --teachers.select."""
        return self.family in ("multi-teacher", "asmb")


METHOD_SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("teacher", "teacher"),
        MethodSpec("ce", "baseline", None, "kd.methods.ce:CE"),
        MethodSpec("kd", "logit", KDCfg, "kd.methods.kd:KD"),
        MethodSpec("dkd", "logit", DKDCfg, "kd.methods.dkd:DKD"),
        MethodSpec("dist", "logit", DISTCfg, "kd.methods.dist:DIST"),
        MethodSpec("fitnet", "feature", FitNetCfg, "kd.methods.fitnet:FitNet"),
        MethodSpec("at", "feature", ATCfg, "kd.methods.at:AT"),
        MethodSpec("crd", "feature", CRDCfg, "kd.methods.crd:CRD"),
        MethodSpec("rkd", "feature", RKDCfg, "kd.methods.rkd:RKD"),
        MethodSpec("pkt", "feature", PKTCfg, "kd.methods.pkt:PKT"),
        MethodSpec("sp", "feature", SPCfg, "kd.methods.sp:SP"),
        MethodSpec("aver", "multi-teacher", AverCfg, "kd.methods.aver:Aver"),
        MethodSpec("camkd", "multi-teacher", CAMKDCfg, "kd.methods.camkd:CAMKD"),
        MethodSpec("ebkd", "multi-teacher", EBKDCfg, "kd.methods.ebkd:EBKD"),
        MethodSpec("aekd", "multi-teacher", AEKDCfg, "kd.methods.aekd:AEKD"),
        MethodSpec("asmb", "asmb", AsmbCfg),
    )
}


def method_class(name: str) -> type:
    """The Method subclass of `name` (imports its module: torch loads here)."""
    spec = METHOD_SPECS[name]
    if not spec.impl:
        raise KeyError(f"--method {name} is run by train.py's own loop, not by a Method class")
    module, cls = spec.impl.split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, options, student, teachers: list, data, label_smoothing: float = 0.0):
    """Method `name` with its `options` (its config dataclass; None without) for `student` distilling from
    `teachers` on the kd.data.DataSplits `data`: its class count, training-split size and image size, and the
    training labels in loader order for a method that samples by class (CRD's needs_index)."""
    from ..data import labels_in_order  # torch loads here, as with method_class

    cls = method_class(name)
    labels = labels_in_order(data.train, data.train_labels) if cls.needs_index else None
    return cls(
        options,
        student,
        teachers,
        num_classes=data.num_classes,
        num_train=len(data.train),
        label_smoothing=label_smoothing,
        image_size=data.image_size,
        train_labels=labels,
    )


def method_names(*families: str) -> tuple[str, ...]:
    """Method names in table order, of the given families (all when none is given)."""
    return tuple(n for n, s in METHOD_SPECS.items() if not families or s.family in families)


__all__ = ["METHOD_SPECS", "MethodSpec", "build_method", "method_class", "method_names"]
