"""Hydra config tree of medexp, installed as the package data `medexp.conf`."""
