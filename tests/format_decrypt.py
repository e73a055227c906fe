#!/usr/bin/env python3
"""An independent decoder of panoptic-sync objects, written from docs/FORMAT.md only.

usage: format_decrypt.py KEYFILE OBJECT_KEY [NAME_OUT [STORE_DIR]] < object > original
OBJECT_KEY is the object's key relative to the destination's URL path (version 2 containers
are bound to it). Decrypts (for .enc, versions 1 and 2) and decompresses (.gz/.zst, via the
gzip module and the `zstd` tool), checks the metadata record, and writes the original to
stdout; with NAME_OUT, also writes the logical key recovered by the layout rule there.
A pointer of the content layout (`.ptr`, `.ptr.enc`) is followed to its blob, read from
STORE_DIR (the store's files, keys relative to the URL path); KEYFILE is then the key the
blobs are written with (`-` without encryption).
A segment of a growing file (a key under _panoptic-sync/segments/) is bound as a segment,
its record must name its file, and NAME_OUT gets "<logical key> <generation> <seq> <offset>".
Exit 1 on any failure."""
import gzip
import hashlib
import json
import struct
import subprocess
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def decrypt(master: bytes, data: bytes, bound: str) -> bytes:
    header = data[:57]
    if len(header) < 57 or header[:8] != b"PSYNCENC" or header[8] not in (1, 2):
        raise ValueError("not a version 1 or 2 container")
    log2 = header[9]
    if not 10 <= log2 <= 24:
        raise ValueError("bad chunk size")
    key_id = hashlib.sha256(b"panoptic-sync key id v1" + master).digest()[:8]
    if header[10:18] != key_id:
        raise ValueError("encrypted under another key")
    salt, prefix = header[18:50], header[50:57]
    if header[8] == 1:
        info = b"panoptic-sync v1 object key" + header
    else:
        b = bound.encode()
        info = b"panoptic-sync v2 object key" + header + struct.pack(">I", len(b)) + b
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)
    aes = AESGCM(k)
    sealed = (1 << log2) + 16
    body = data[57:]
    out = bytearray()
    i = 0
    pos = 0
    while True:
        chunk = body[pos:pos + sealed]
        last = pos + sealed >= len(body)
        nonce = prefix + struct.pack(">I", i) + (b"\x01" if last else b"\x00")
        out += aes.decrypt(nonce, chunk, b"")
        if last:
            return bytes(out)
        pos += sealed
        i += 1


def short_name(name: str) -> str:
    raw = name.encode()
    cut = min(32, len(raw))
    while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # not a character boundary
        cut -= 1
    return raw[:cut].decode() + "~" + hashlib.sha256(raw).hexdigest()[:32] + ".long"


SEGMENTS = "_panoptic-sync/segments/"


def segment_of(key: str):
    """(logical key, generation, seq, offset) of a segment's key, read from its end."""
    rest = key[len(SEGMENTS):]
    directory, name = rest.rsplit("/", 1)
    if not directory.endswith("~tail") or len(directory) == len("~tail"):
        raise ValueError("not a segment's key")
    for suffix in (".enc", ".zst", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            if suffix == ".enc":
                continue
            break
    if not name.endswith(".seg"):
        raise ValueError("not a segment's key")
    numbers = name[:-4].split("-")
    widths = [len(n) for n in numbers]
    if widths != [20, 10, 20] or not all(n.isdigit() for n in numbers):
        raise ValueError("not a segment's key")
    return (directory[: -len("~tail")],) + tuple(int(n) for n in numbers)


def master_key(keyfile: str) -> bytes:
    return bytes.fromhex("".join(open(keyfile).read().split()))


def decode(keyfile: str, key: str, data: bytes, bound: str):
    """The stages of `key` undone: (original, metadata record or None, key without suffixes)."""
    record = None
    if key.endswith(".enc"):
        plain = decrypt(master_key(keyfile), data, bound)
        (n,) = struct.unpack(">I", plain[:4])
        record = json.loads(plain[4:4 + n])
        data = plain[4 + n:]
        key = key[:-4]
    if key.endswith(".ptr"):
        return data, record, key
    if key.endswith(".gz"):
        data = gzip.decompress(data)
        key = key[:-3]
    elif key.endswith(".zst"):
        data = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, check=True,
                              capture_output=True).stdout
        key = key[:-4]
    if record is not None:
        if record["size"] != len(data) or record["sha256"] != hashlib.sha256(data).hexdigest():
            raise ValueError("content does not match the metadata record")
    return data, record, key


def logical_of(key: str, path) -> str:
    """The layout rule read back: a shortened long name (full name `path`), or an escape."""
    if key.endswith(".long"):
        if path is None:
            raise ValueError("a shortened name without its full name")
        full = path.rsplit("/", 1)[-1]
        if short_name(full) != key.rsplit("/", 1)[-1]:
            raise ValueError("the full name does not match the key")
        return key.rsplit("/", 1)[0] + "/" + full if "/" in key else full
    if key.endswith(".asis"):
        return key[:-5]
    return key


def follow_pointer(keyfile: str, key: str, data: bytes, store: str):
    """A pointer's file: (original, logical key), its blob read from `store`."""
    body, record, rest = decode(keyfile, key, data, "\0pointer\0" + key)
    p = json.loads(body)
    if p.get("pointer") != 1:
        raise ValueError("a pointer format this decoder does not know")
    logical = logical_of(rest[:-4], p["path"])
    if p["path"] != logical or (record is not None and record.get("path") != logical):
        raise ValueError(f"the pointer names {p['path']!r}, its key {logical!r}")
    blob = p["blob"]
    parts = blob.split("/")
    name = parts[-1].removesuffix(".enc").removesuffix(".zst").removesuffix(".gz")
    if len(parts) != 5 or parts[:2] != ["_panoptic-sync", "blobs"] or parts[3] != name[:2]:
        raise ValueError(f"{blob!r} is not a blob key")
    if blob.endswith(".enc") != key.endswith(".enc"):
        raise ValueError("a pointer and its blob differ in encryption")
    if parts[2] == "sha256":
        if name != p["sha256"]:
            raise ValueError("the blob is named for another content")
    else:
        master = master_key(keyfile)
        key_id = hashlib.sha256(b"panoptic-sync key id v1" + master).digest()[:8]
        want = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"panoptic-sync blob name v1",
                    info=bytes.fromhex(p["sha256"])).derive(master).hex()
        if parts[2] != "key-" + key_id.hex() or name != want:
            raise ValueError("the blob's keyed name is not the content's")
    with open(f"{store}/{blob}", "rb") as f:
        raw = f.read()
    content, _, _ = decode(keyfile, blob, raw, "\0blob\0" + blob)
    if len(content) != p["size"] or hashlib.sha256(content).hexdigest() != p["sha256"]:
        raise ValueError(f"blob {blob} does not hold the content its pointer names")
    return content, logical


def main() -> int:
    keyfile, key = sys.argv[1], sys.argv[2]
    data = sys.stdin.buffer.read()
    if key.startswith(SEGMENTS):
        segment = segment_of(key)
        # A segment is bound to its key behind "\0segment\0".
        data, record, _ = decode(keyfile, key, data, "\0segment\0" + key)
        if record is not None and record.get("path") != segment[0]:
            raise ValueError(f"the record names {record.get('path')!r}, the key {segment[0]!r}")
        if len(sys.argv) > 3:
            with open(sys.argv[3], "w", encoding="utf-8") as f:
                f.write(" ".join(str(x) for x in segment))
        sys.stdout.buffer.write(data)
        return 0
    if key.removesuffix(".enc").endswith(".ptr"):
        if len(sys.argv) < 5:
            raise ValueError("a pointer needs STORE_DIR to read its blob from")
        data, logical = follow_pointer(keyfile, key, data, sys.argv[4])
    else:
        bound = key
        # A run's manifest is bound to its key behind "\0manifest\0" (no file's key can be).
        stripped = key.removesuffix(".enc").removesuffix(".zst").removesuffix(".gz")
        if stripped == "_run/manifest.json" or stripped.endswith("/_run/manifest.json"):
            bound = "\0manifest\0" + key
        data, record, rest = decode(keyfile, key, data, bound)
        logical = logical_of(rest, record.get("path") if record else None)
        if record is not None and "path" in record and record["path"] != logical:
            raise ValueError(f"the record names {record['path']!r}, the key {logical!r}")
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w", encoding="utf-8") as f:
            f.write(logical)
    sys.stdout.buffer.write(data)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - any failure is a failed decode
        print(f"format_decrypt: {e}", file=sys.stderr)
        sys.exit(1)
