"""Master keys behind a key-provider interface: they wrap each subject's data key.

Providers wrap and unwrap rather than hand out key material, so a KMS or HSM provider can implement
the same interface without the master key ever entering this process. The ones here keep keys in
memory, loaded from settings (environment) or from a JSON file in the data dir (development).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from identity.errors import KeyMaterialError, TamperedCiphertext

KEY_BYTES = 32


class KeyProvider(ABC):
    """Wraps and unwraps data keys under named master keys."""

    @property
    @abstractmethod
    def current_key_id(self) -> str:
        """The master key that wraps new data keys."""

    @abstractmethod
    def wrap(self, key_id: str, data_key: bytes, context: bytes) -> bytes:
        """Encrypt `data_key` under master key `key_id`, bound to `context`."""

    @abstractmethod
    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a wrapped data key; raises TamperedCiphertext if it or its context was altered."""


class StaticKeyProvider(KeyProvider):
    """Master keys held in memory (AES-256-GCM key wrapping with the context as associated data)."""

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise KeyMaterialError(f"master key {current!r} is not configured")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise KeyMaterialError(f"master key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
        self._keys = {k: AESGCM(v) for k, v in keys.items()}
        self._current = current

    @property
    def current_key_id(self) -> str:
        return self._current

    def _aead(self, key_id: str) -> AESGCM:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyMaterialError(f"master key {key_id!r} is not configured") from None

    def wrap(self, key_id: str, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead(key_id).encrypt(nonce, data_key, context)

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead(key_id).decrypt(wrapped[:12], wrapped[12:], context)
        except InvalidTag as exc:
            raise TamperedCiphertext("a wrapped data key failed authentication") from exc


def decode_key(text: str) -> bytes:
    """A key given as hex (optionally 0x-prefixed) or as base64/base64url."""
    text = text.strip()
    hexed = text.removeprefix("0x")
    if hexed and len(hexed) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in hexed):
        return bytes.fromhex(hexed)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise KeyMaterialError("a key must be hex or base64") from exc


class FileKeyProvider(StaticKeyProvider):
    """Master keys in a JSON file `{"current": ID, "keys": {ID: hex}}` (development; mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            keys = {str(k): decode_key(v) for k, v in raw["keys"].items()}
            current = str(raw["current"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyMaterialError(f"cannot read master keys from {path}: {exc.__class__.__name__}") from exc
        super().__init__(keys, current)

    def _aead(self, key_id: str) -> AESGCM:
        if key_id not in self._keys:  # added by another process since (`add_key`): read the file again
            self.__init__(self.path)  # type: ignore[misc]
        return super()._aead(key_id)

    @classmethod
    def create(cls, path: Path, key_id: str = "k1") -> FileKeyProvider:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"current": key_id, "keys": {key_id: secrets.token_hex(KEY_BYTES)}}, handle)
        return cls(path)

    def add_key(self, key_id: str) -> None:
        """Add a new master key and make it current (then run `Vault.rotate_master_key`)."""
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        if key_id in raw["keys"]:
            raise KeyMaterialError(f"master key {key_id!r} exists already")
        raw["keys"][key_id] = secrets.token_hex(KEY_BYTES)
        raw["current"] = key_id
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(raw, handle)
        os.replace(tmp, self.path)
        self.__init__(self.path)  # type: ignore[misc]
