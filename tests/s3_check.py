#!/usr/bin/env python3
"""Independent check of an S3 bucket for the tests: lists every object under a prefix with
boto3 (not object_store), downloads it, and prints {key: sha256 hex} as JSON.
With a sixth argument DIR, each object's raw bytes are also written to DIR/<key>.
With the arguments `put KEY FILE` instead, uploads FILE's bytes under KEY (crafted objects);
with `head KEY`, prints the object's ContentType, ContentEncoding and ContentLength."""
import os
import hashlib
import json
import sys

import boto3
from botocore.config import Config

endpoint, key, secret, bucket, prefix = sys.argv[1:6]
rest = sys.argv[6:]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id=key,
    aws_secret_access_key=secret,
    region_name="us-east-1",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
)
if prefix == "head":
    h = s3.head_object(Bucket=bucket, Key=rest[0])
    print(json.dumps({k: h.get(k) for k in ("ContentType", "ContentEncoding", "ContentLength")}))
    sys.exit(0)
if prefix == "put":
    s3.put_object(Bucket=bucket, Key=rest[0], Body=open(rest[1], "rb").read())
    print("{}")
    sys.exit(0)
dump = rest[0] if rest else None
out = {}
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        out[obj["Key"]] = hashlib.sha256(body).hexdigest()
        if dump:
            path = os.path.join(dump, obj["Key"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
json.dump(out, sys.stdout)
