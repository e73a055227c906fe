# Extract the real index rows (read-only) into data.pkl.
import os, pickle, sqlite3
c = sqlite3.connect('file:' + os.environ['INDEX'] + '?mode=ro', uri=True)
files = c.execute("SELECT id, path, size, mtime_ns, inode, sha256, gen, indexed_ms, dev FROM files ORDER BY id").fetchall()
contents = {r[0]: (r[1], r[2]) for r in c.execute("SELECT sha256, size, first_seen_ms FROM contents")}
ups = c.execute("SELECT file_id, dest, key, sha256, gen, state, attempts, next_attempt_ms, last_error, permanent, queued_ms, done_ms, method FROM uploads").fetchall()
objs = {r[1]: r for r in c.execute("SELECT dest, key, stored_key, sha256, size, stored_size, pipeline, stored_ms FROM objects")}
pickle.dump(dict(files=files, contents=contents, uploads=ups, objects=objs), open(os.path.join(os.environ['WORK'], 'data.pkl'), 'wb'))
print(len(files), len(contents), len(ups), len(objs))
