"""The LUKS (version 1) header of an encrypted qcow2 image, read for ``info`` only.

tapnbd holds no keys and never decrypts: this reads what ``qemu-img info`` shows without
a key (the cipher, the hash, the key slots) from the header that qcow2's crypto header
extension points at, as hostile input. The layout is cryptsetup's on-disk format 1.2
(big-endian): magic, version, cipher name, cipher mode, hash spec, payload offset, key
bytes, master key digest, its salt and iterations, uuid, then 8 key slots of 48 bytes.
Names and checks follow qemu's crypto/block-luks.c.
"""

from __future__ import annotations

import struct

from tapnbd.errors import InvalidImageError

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512
HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
SLOT = struct.Struct(">II32sII")
SIZE = HEADER.size + 8 * SLOT.size  # 592
SLOT_ENABLED, SLOT_DISABLED = 0x00AC71F3, 0x0000DEAD
STRIPES = 4000  # "Keyslot is corrupted (stripes != 4000)", as qemu checks

#: Cipher name -> the key sizes (bytes) qemu knows it with.
CIPHERS = {
    "aes": (16, 24, 32),
    "cast5": (16,),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
    "sm4": (16,),
}
MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64", "essiv")
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3")


def _text(raw: bytes, field: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise InvalidImageError(f"LUKS header: {field} is not NUL-terminated")
    try:
        text = raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidImageError(f"LUKS header: {field} is not ASCII") from None
    if not text.isprintable():
        raise InvalidImageError(f"LUKS header: {field} {text!r} is not printable")
    return text


def luks_info(data: bytes, area_length: int) -> dict[str, object]:
    """What qemu-img info shows of the LUKS header ``data`` (its first 592 bytes),
    keys in its order; every field checked, and each slot's key material inside the
    ``area_length`` bytes of the crypto header."""
    if len(data) < SIZE:
        raise InvalidImageError(f"LUKS header: {len(data)} bytes, not {SIZE}")
    (magic, version, cname, cmode, hspec, payload, key_bytes, _digest, _salt, mk_iters, uuid) = (
        HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise InvalidImageError(f"LUKS header: magic {magic!r} is not {MAGIC!r}")
    if version != 1:
        raise InvalidImageError(f"LUKS header: version {version} is not supported (only 1)")
    cipher, mode_spec, hash_alg = (
        _text(cname, "cipher name"),
        _text(cmode, "cipher mode"),
        _text(hspec, "hash spec"),
    )
    mode, _, ivspec = mode_spec.partition("-")
    ivgen, _, ivhash = ivspec.partition(":")
    if mode not in MODES or ivgen not in IVGENS:
        raise InvalidImageError(f"LUKS header: cipher mode {mode_spec!r} is not supported")
    if (ivgen == "essiv") != bool(ivhash) or (ivhash and ivhash not in HASHES):
        raise InvalidImageError(f"LUKS header: cipher mode {mode_spec!r}: bad IV hash")
    if hash_alg not in HASHES:
        raise InvalidImageError(f"LUKS header: hash spec {hash_alg!r} is not supported")
    cipher_bytes = key_bytes // 2 if mode == "xts" else key_bytes  # XTS keys are two keys
    if (
        cipher not in CIPHERS
        or cipher_bytes not in CIPHERS[cipher]
        or (key_bytes % 2 and mode == "xts")
    ):
        raise InvalidImageError(
            f"LUKS header: cipher {cipher!r} with key_bytes {key_bytes} is not supported"
        )
    slots: list[dict[str, object]] = []
    for i in range(8):
        active, iters, _ssalt, key_sector, stripes = SLOT.unpack_from(
            data, HEADER.size + i * SLOT.size
        )
        if active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise InvalidImageError(f"LUKS key slot {i}: active 0x{active:x} is corrupt")
        if stripes != STRIPES:
            raise InvalidImageError(f"LUKS key slot {i}: stripes {stripes}, not {STRIPES}")
        start = key_sector * SECTOR
        if start < SIZE or start + key_bytes * stripes > area_length:
            raise InvalidImageError(
                f"LUKS key slot {i}: key material at {start} lies outside the crypto header"
            )
        slot: dict[str, object] = {"active": active == SLOT_ENABLED}
        if active == SLOT_ENABLED:
            slot["iters"] = iters
        slot["key-offset"] = start
        if active == SLOT_ENABLED:
            slot["stripes"] = stripes
        slots.append(slot)
    info: dict[str, object] = {"ivgen-alg": ivgen, "hash-alg": hash_alg}
    info["cipher-alg"] = f"{cipher}-{cipher_bytes * 8}"
    info["uuid"] = _text(uuid, "uuid")
    if ivhash:
        info["ivgen-hash-alg"] = ivhash
    info.update({"format": "luks", "cipher-mode": mode, "slots": slots})
    info.update({"payload-offset": payload * SECTOR, "master-key-iters": mk_iters})
    return info
