"""The semi-supervised methods, one module each: a small subclass of ``SemiSupervisedTrainerBase`` that computes
its loss terms, plus its variants (one-line subclasses named nnU-Net style).

Every ``nnUNetTrainer*`` class defined in these modules is exported here, so a new variant needs no list entry;
``trainers/`` re-exports them for nnU-Net's ``nnUNet_extTrainer`` lookup. A new method adds its module to
``_METHOD_MODULES``. Their order is the benchmark's default trainer order. ``nnUNetTrainer_warmStart`` (stock
nnU-Net warm-started like the methods, their control) is exported beside them.
"""

from nnunet_semi.methods import bcp, cifp, cps, dual_cce, mean_teacher, np_calibration, sgrs

_METHOD_MODULES = (sgrs, np_calibration, cifp, dual_cce, cps, mean_teacher, bcp)

__all__: list[str] = []
for _module in _METHOD_MODULES:
    for _name, _value in vars(_module).items():
        if _name.startswith("nnUNetTrainer") and isinstance(_value, type) and _value.__module__ == _module.__name__:
            globals()[_name] = _value
            __all__.append(_name)
del _module, _name, _value

from nnunet_semi.trainer.warm_start import nnUNetTrainer_warmStart  # noqa: E402, F401 (exported)

__all__.append("nnUNetTrainer_warmStart")
