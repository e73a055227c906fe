#!/usr/bin/env python3
"""Independent clients for the Azure and GCS test servers (not object_store).

  cloud_check.py azure ENDPOINT create CONTAINER
  cloud_check.py azure ENDPOINT list CONTAINER PREFIX      -> {name: sha256 hex}
  cloud_check.py azure ENDPOINT put CONTAINER NAME          a small blob under any name
  cloud_check.py gcs ENDPOINT create BUCKET                 (fake-gcs-server JSON API)
  cloud_check.py gcs ENDPOINT seed BUCKET DIR PREFIX        upload DIR/* as PREFIX/<rel>
  cloud_check.py gcs ENDPOINT list BUCKET PREFIX            -> {name: sha256 hex}
  cloud_check.py gcs ENDPOINT put BUCKET NAME               a small object under any name
"""
import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request

# Azurite's well-known development account.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def azure(endpoint, op, container, *rest):
    from azure.storage.blob import BlobServiceClient
    conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={endpoint}/{ACCOUNT};")
    client = BlobServiceClient.from_connection_string(conn).get_container_client(container)
    if op == "create":
        client.create_container()
        return {}
    if op == "put":
        client.upload_blob(rest[0], b"planted")
        return {}
    out = {}
    for blob in client.list_blobs(name_starts_with=rest[0]):
        data = client.download_blob(blob.name).readall()
        out[blob.name] = hashlib.sha256(data).hexdigest()
    return out


def gcs(endpoint, op, bucket, *rest):
    if op == "create":
        req = urllib.request.Request(f"{endpoint}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()
        return {}
    def upload(key, data):
        url = (f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
               + urllib.parse.quote(key, safe=""))
        req = urllib.request.Request(url, method="POST", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req).read()

    if op == "seed":
        directory, prefix = rest
        for root, _, files in os.walk(directory):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, directory)
                upload(f"{prefix}/{rel}" if prefix else rel, open(path, "rb").read())
        return {}
    if op == "put":
        upload(rest[0], b"planted")
        return {}
    out = {}
    token = None
    while True:
        q = {"prefix": rest[0]}
        if token:
            q["pageToken"] = token
        url = f"{endpoint}/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(q)
        page = json.loads(urllib.request.urlopen(url).read())
        for item in page.get("items", []):
            media = (f"{endpoint}/storage/v1/b/{bucket}/o/"
                     + urllib.parse.quote(item["name"], safe="") + "?alt=media")
            out[item["name"]] = hashlib.sha256(urllib.request.urlopen(media).read()).hexdigest()
        token = page.get("nextPageToken")
        if not token:
            return out


if __name__ == "__main__":
    kind, endpoint, op, name, *rest = sys.argv[1:]
    result = (azure if kind == "azure" else gcs)(endpoint, op, name, *rest)
    json.dump(result, sys.stdout)
