#!/usr/bin/env python3
"""An independent decoder of panoptic-sync objects, written from docs/FORMAT.md only.

usage: format_decrypt.py KEYFILE OBJECT_KEY < object > original
Decrypts (for .enc) and decompresses (.gz/.zst, via the gzip module and the `zstd` tool),
checks the metadata record, and writes the original to stdout. Exit 1 on any failure."""
import gzip
import hashlib
import json
import struct
import subprocess
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def decrypt(master: bytes, data: bytes) -> bytes:
    header = data[:57]
    if len(header) < 57 or header[:8] != b"PSYNCENC" or header[8] != 1:
        raise ValueError("not a version 1 container")
    log2 = header[9]
    if not 10 <= log2 <= 24:
        raise ValueError("bad chunk size")
    key_id = hashlib.sha256(b"panoptic-sync key id v1" + master).digest()[:8]
    if header[10:18] != key_id:
        raise ValueError("encrypted under another key")
    salt, prefix = header[18:50], header[50:57]
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
             info=b"panoptic-sync v1 object key" + header).derive(master)
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


def main() -> int:
    keyfile, key = sys.argv[1], sys.argv[2]
    data = sys.stdin.buffer.read()
    record = None
    if key.endswith(".enc"):
        master = bytes.fromhex("".join(open(keyfile).read().split()))
        plain = decrypt(master, data)
        (n,) = struct.unpack(">I", plain[:4])
        record = json.loads(plain[4:4 + n])
        data = plain[4 + n:]
        key = key[:-4]
    if key.endswith(".gz"):
        data = gzip.decompress(data)
    elif key.endswith(".zst"):
        data = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, check=True,
                              capture_output=True).stdout
    if record is not None:
        if record["size"] != len(data) or record["sha256"] != hashlib.sha256(data).hexdigest():
            raise ValueError("content does not match the metadata record")
    sys.stdout.buffer.write(data)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - any failure is a failed decode
        print(f"format_decrypt: {e}", file=sys.stderr)
        sys.exit(1)
