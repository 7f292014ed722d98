"""nnU-Net trainers of nnunet-semi."""

__all__: list[str] = []
