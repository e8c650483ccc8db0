"""medexp: Hydra-composed PyTorch Lightning experiments for deep learning on medical images."""

__version__ = "0.1.0"
