# Installed as nnunet_semi.ext_trainers. Nothing else may live in this folder: nnU-Net imports every module in it.
