"""kd: knowledge distillation for PyTorch (ASMB multi-teacher distillation and exact baselines).

Self-contained: imports only torch, torchvision, timm, einops (plus numpy/PIL), so the folder can be
copied into other research code. `import kd` registers the CIFAR model zoo (kd.zoo) with timm.
"""

__version__ = "0.1.0"

import sys


def _register_zoo_with_timm() -> None:
    """Register kd.zoo with timm now when timm is loaded, else right after timm's own import: `import kd` stays
    light (kd.configs and kd.errors load without torch, so a CLI's --help is fast) and `import kd, timm` still
    knows the zoo names."""
    if "timm" in sys.modules:
        from . import zoo  # noqa: F401

        return
    import importlib
    import importlib.abc
    import importlib.util

    class RegisterZooAfterTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "timm":
                return None
            sys.meta_path.remove(self)  # once: the finders below resolve timm itself
            spec = importlib.util.find_spec("timm")
            if spec is None or spec.loader is None:
                return spec
            exec_timm = spec.loader.exec_module

            def exec_then_register(module):
                exec_timm(module)
                importlib.import_module("kd.zoo")

            spec.loader.exec_module = exec_then_register
            return spec

    if not any(type(f).__name__ == "RegisterZooAfterTimm" for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterZooAfterTimm())


_register_zoo_with_timm()
