"""Device side of ADB authentication.

A host key is authorised when its Android-format public key (``~/.android/adbkey.pub``: base64 of
mincrypt's ``RSAPublicKey`` struct, then `` user@host``) is in the device's list. The device sends a
20-byte random token; the host signs it with RSA PKCS#1 v1.5 *as if it were a SHA-1 digest* (adb
calls ``RSA_sign(NID_sha1, token, 20, ...)``; adb-shell's signers wrap the token in the SHA-1
DigestInfo without hashing it). So verification is PKCS#1 v1.5 over a pre-hashed SHA-1 value.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .protocol import TOKEN_SIZE


@dataclass(frozen=True)
class AndroidPublicKey:
    modulus: int
    exponent: int
    comment: str = ""

    @property
    def bits(self) -> int:
        return self.modulus.bit_length()

    def crypto_key(self) -> rsa.RSAPublicKey:
        return rsa.RSAPublicNumbers(self.exponent, self.modulus).public_key()

    def verify(self, token: bytes, signature: bytes) -> bool:
        try:
            self.crypto_key().verify(signature, token, padding.PKCS1v15(), utils.Prehashed(hashes.SHA1()))
            return True
        except (InvalidSignature, ValueError):
            return False


def parse_public_key(text: str | bytes) -> AndroidPublicKey:
    """One line of adbkey.pub (``BASE64 [comment]``, NUL-terminated on the wire) -> key.

    Raises ValueError for anything that is not a well-formed Android RSA public key.
    """
    if isinstance(text, bytes):
        text = text.split(b"\0", 1)[0].decode("ascii", "replace")
    text = text.strip()
    if not text:
        raise ValueError("empty public key")
    b64, _, comment = text.partition(" ")
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public key is not base64: {exc}") from None
    if len(blob) < 12:
        raise ValueError("public key too short")
    words, _n0inv = struct.unpack_from("<II", blob, 0)
    size = words * 4
    if words == 0 or len(blob) != 8 + 2 * size + 4:
        raise ValueError(f"public key has {len(blob)} bytes, expected {8 + 2 * size + 4} for {words} words")
    modulus = int.from_bytes(blob[8:8 + size], "little")
    (exponent,) = struct.unpack_from("<I", blob, 8 + 2 * size)
    if modulus < 3 or exponent not in (3, 65537):
        raise ValueError("public key has an implausible modulus or exponent")
    return AndroidPublicKey(modulus, exponent, comment.strip())


def load_public_keys(source) -> list[AndroidPublicKey]:
    """Keys from a str/bytes (one key per line), an AndroidPublicKey, a path to a .pub file, or a list."""
    if source is None:
        return []
    if isinstance(source, AndroidPublicKey):
        return [source]
    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.isfile(source)):
        with open(source, "rb") as fh:
            return load_public_keys(fh.read())
    if isinstance(source, (str, bytes)):
        if isinstance(source, bytes):
            source = source.replace(b"\0", b"\n").decode("ascii", "replace")
        return [parse_public_key(line) for line in source.splitlines() if line.strip()]
    keys: list[AndroidPublicKey] = []
    for item in source:
        keys.extend(load_public_keys(item))
    return keys


def new_token() -> bytes:
    return os.urandom(TOKEN_SIZE)
