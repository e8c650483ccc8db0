"""Config checks, instantiation helpers, run metadata and checkpoint I/O (kept import-light)."""
