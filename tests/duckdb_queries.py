"""Run the DuckDB queries of docs/OPERATIONS.md (each ```sql block after a
`<!-- duckdb: NAME -->` line), exactly as written there but for the store directory, over a
file:// store. Prints {NAME: [row, ...]} as JSON, each row a dict.

usage: duckdb_queries.py OPERATIONS.md STORE_DIR
"""
import json
import re
import sys

import duckdb

doc, store = sys.argv[1], sys.argv[2]
text = open(doc, encoding="utf-8").read()
out = {}
for name, sql in re.findall(r"<!-- duckdb: (\w+) -->\s*```sql\n(.*?)```", text, re.S):
    sql = sql.replace("/mnt/nas/panoptic", store.rstrip("/"))
    cur = duckdb.sql(sql)
    cols = [d[0] for d in cur.description]
    out[name] = [
        {c: (float(v) if hasattr(v, "as_integer_ratio") and not isinstance(v, int) else v)
         for c, v in zip(cols, row)}
        for row in cur.fetchall()
    ]
if not out:
    sys.exit("no duckdb queries found in " + doc)
print(json.dumps(out, default=str))
