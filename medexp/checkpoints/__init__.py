"""Checkpoints and the configs they store: what may be built from them (:mod:`.allowlist`)."""
