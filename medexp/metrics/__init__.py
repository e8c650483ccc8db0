"""Metrics torchmetrics and MONAI do not offer as such, built on theirs."""
