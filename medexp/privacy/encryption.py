"""Encryption at rest: checkpoints (and any file medexp caches) sealed with AES-256-GCM.

The key is never in a config or a file medexp writes: it lives in an environment variable whose
*name* the config gives (``encryption.key_env=MEDEXP_KEY``; null: off). A key is 32 random bytes
as URL-safe base64 (44 characters); ``python -m medexp.privacy.encryption`` prints a new one.

An encrypted file starts with a magic header that also names the variable it was sealed with, so
every reader (``medexp eval``, ``predict``, ``export``, ``reproduce``, resuming a run) finds it
without being told, and says what is wrong: ``checkpoint X is encrypted; set MEDEXP_KEY`` when
the variable is unset, ``cannot decrypt X with the key in MEDEXP_KEY`` for a wrong key or an
altered file. Files without the header are read as they are (e.g. checkpoints from before
encryption was turned on).

Format (version 1): ``MAGIC | version | len(name) | name | 7-byte nonce prefix | chunk size``,
then the plaintext in chunks of ``chunk size`` bytes, each sealed with AES-GCM under the nonce
``prefix | chunk index | last-chunk flag`` and the header as associated data (the STREAM
construction): chunks cannot be reordered, dropped or truncated unnoticed, and files larger than
one AES-GCM call allows (2 GiB in ``cryptography``) work.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import secrets
import struct
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

MAGIC = b"MEDEXP-ENC"
VERSION = 1
CHUNK_SIZE = 16 * 2**20
_TAG = 16  # bytes AES-GCM appends to every chunk
_PREFIX = 7  # random bytes of each file's nonces; with a 4-byte index and a flag byte: 12
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def generate_key() -> str:
    """A new random key: 32 bytes as URL-safe base64, the form the key variable holds."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def key_problem(key_env: str) -> str | None:
    """Why the variable ``key_env`` cannot serve as a key (unset, or not a key), or None."""
    if not ENV_NAME.match(key_env):
        return f"encryption.key_env={key_env!r} is not an environment variable name (letters, digits, _)"
    value = os.environ.get(key_env)
    if not value:
        return f"encryption.key_env={key_env}, but {key_env} is not set; export it with your key (a new one: `python -m medexp.privacy.encryption`)"
    try:
        raw = base64.urlsafe_b64decode(value.strip().encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        return (
            f"{key_env} does not hold a medexp key (32 bytes as URL-safe base64, 44 characters); "
            "generate one with `python -m medexp.privacy.encryption`"
        )
    return None


def _key(key_env: str) -> bytes:
    problem = key_problem(key_env)
    if problem is not None:
        raise MedexpError(problem)
    return base64.urlsafe_b64decode(os.environ[key_env].strip().encode())


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` (a file's content, or at least its first bytes) was sealed by medexp."""
    return data[: len(MAGIC)] == MAGIC


def is_encrypted_file(path: str | Path) -> bool:
    """Whether the file at ``path`` starts with medexp's encryption header."""
    with open(path, "rb") as file:
        return is_encrypted(file.read(len(MAGIC)))


def _cipher(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise MedexpError("encrypted files need the package 'cryptography': pip install 'medexp[privacy]'") from exc
    return AESGCM(key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">I?", index, last)


def encrypt_bytes(data: bytes, key_env: str, chunk_size: int = CHUNK_SIZE) -> bytes:
    """Seal ``data`` with the key in the environment variable ``key_env``.

    Raises:
        MedexpError: when ``key_env`` is unset or does not hold a key.
    """
    cipher = _cipher(_key(key_env))
    name = key_env.encode()
    prefix = secrets.token_bytes(_PREFIX)
    header = MAGIC + struct.pack(">BB", VERSION, len(name)) + name + prefix + struct.pack(">I", chunk_size)
    chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)] or [b""]
    sealed = [cipher.encrypt(_nonce(prefix, i, i == len(chunks) - 1), chunk, header) for i, chunk in enumerate(chunks)]
    return header + b"".join(sealed)


def decrypt_bytes(data: bytes, where: str) -> bytes:
    """The plaintext of ``data`` sealed by :func:`encrypt_bytes`, with the key in the variable
    its header names.

    Args:
        data: the sealed bytes.
        where: what ``data`` is, for messages (e.g. ``"checkpoint runs/x/best.ckpt"``).

    Raises:
        MedexpError: when the variable is unset or holds no key, the key is not the one ``data``
            was sealed with (or ``data`` was altered), or ``data`` is truncated.
    """
    corrupt = MedexpError(f"{where} is encrypted but truncated or corrupt: its header cannot be read")
    start = len(MAGIC)
    if len(data) < start + 2:
        raise corrupt
    version, name_length = struct.unpack(">BB", data[start : start + 2])
    if version != VERSION:
        raise MedexpError(f"{where} is encrypted with format version {version}; this medexp reads version {VERSION}")
    name_end = start + 2 + name_length
    header_end = name_end + _PREFIX + 4
    if len(data) < header_end + _TAG:
        raise corrupt
    key_env = data[start + 2 : name_end].decode("ascii", errors="replace")
    prefix = data[name_end : name_end + _PREFIX]
    (chunk_size,) = struct.unpack(">I", data[name_end + _PREFIX : header_end])
    if not ENV_NAME.match(key_env) or chunk_size < 1:
        raise corrupt
    if not os.environ.get(key_env):
        raise MedexpError(f"{where} is encrypted; set {key_env} to the key it was written with")
    cipher = _cipher(_key(key_env))
    from cryptography.exceptions import InvalidTag

    header, body = data[:header_end], memoryview(data)[header_end:]
    parts = []
    position, index = 0, 0
    try:
        while len(body) - position > chunk_size + _TAG:
            parts.append(
                cipher.decrypt(_nonce(prefix, index, False), body[position : position + chunk_size + _TAG], header)
            )
            position, index = position + chunk_size + _TAG, index + 1
        parts.append(cipher.decrypt(_nonce(prefix, index, True), body[position:], header))
    except InvalidTag:
        raise MedexpError(
            f"cannot decrypt {where} with the key in {key_env} (a different key than it was written with, "
            "or the file was altered or truncated)"
        ) from None
    return b"".join(parts)


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The content of ``path``, decrypted when it carries medexp's header (a plain file as it is).

    Args:
        what: the kind of file, for messages (``"checkpoint"``, ``"cached dataset item"``).
    """
    data = Path(path).read_bytes()
    return decrypt_bytes(data, f"{what} {path}") if is_encrypted(data) else data


def write_bytes(path: str | Path, data: bytes, key_env: str | None) -> None:
    """Write ``data`` to ``path``, sealed with the key in ``key_env`` (None: as it is), through a
    temporary file in the same folder, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = encrypt_bytes(data, key_env) if key_env else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path, key_env: str | None) -> None:
    """``torch.save(obj, path)``, encrypted with the key in ``key_env`` (None: plain)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue(), key_env)


def load_torch(path: str | Path, what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file written by :func:`save_torch` (or plain ``torch.save``),
    decrypted when it is encrypted; always ``weights_only=True``: no file is trusted to run code."""
    import torch

    return torch.load(io.BytesIO(read_bytes(path, what)), map_location=map_location, weights_only=True)


class EncryptedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, encrypting what it saves with the key in ``key_env``.

    Loading decrypts any file with medexp's header (its key variable named there) and reads plain
    files as Lightning does, so a run with ``key_env=None`` still reads encrypted checkpoints
    (``train=false ckpt_path=...``) with a clear message when the key is missing.

    Args:
        key_env: the environment variable holding the key; None writes plain checkpoints.
    """

    def __init__(self, key_env: str | None = None) -> None:
        super().__init__()
        if key_env is not None:
            _key(key_env)  # unset or malformed: refused now, not at the first checkpoint
        self.key_env = key_env

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self.key_env is None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        import torch
        from lightning.fabric.utilities.cloud_io import get_filesystem

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        sealed = encrypt_bytes(buffer.getvalue(), self.key_env)
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(str(path)), exist_ok=True)
        # an fsspec transaction writes to a temporary file and moves it into place on success
        with fs.transaction, fs.open(str(path), "wb") as file:
            file.write(sealed)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        import torch
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(path)
        if not fs.exists(str(path)):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        with fs.open(str(path), "rb") as file:
            data = file.read()
        if is_encrypted(data):
            data = decrypt_bytes(data, f"checkpoint {path}")
        elif self.key_env is not None:
            log.warning("checkpoint %s is not encrypted; reading it as it is", path)
        # never unpickle code, whatever the caller asks (a resumed checkpoint may come from anyone)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems with ``encryption.*`` of a resolved train config (see :mod:`medexp.utils.validation`)."""
    encryption = config.get("encryption") or {}
    key_env = encryption.get("key_env")
    if key_env is None:
        return []
    if not isinstance(key_env, str):
        return [f"encryption.key_env={key_env!r}; expected the name of an environment variable, or null (off)"]
    return [problem] if (problem := key_problem(key_env)) else []


if __name__ == "__main__":  # python -m medexp.privacy.encryption: a new key
    print(generate_key())
