"""Where nnU-Net's ``nnUNet_extTrainer`` lookup finds this plugin's trainers.

The folder holds only modules that re-export trainer classes defined in ``nnunet_semi`` (nnU-Net imports the folder's
modules by top-level name and purges them from ``sys.modules`` afterwards, so classes defined there would not pickle).
In the source tree it is ``trainers/``; in a wheel it ships as ``nnunet_semi/ext_trainers``. Both installs resolve it
through the import system, which is why this does not guess paths.
"""

from __future__ import annotations

import importlib.util
import os


def trainer_dir() -> str:
    """Absolute path of the folder to put in ``nnUNet_extTrainer``."""
    spec = importlib.util.find_spec("nnunet_semi.ext_trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunet_semi.ext_trainers is missing from this installation; reinstall nnunet-semi.")
    return os.path.abspath(list(spec.submodule_search_locations)[0])
