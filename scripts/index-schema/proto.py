#!/usr/bin/env python3
"""Build one candidate index schema from the real rows and report its size per table/index.

usage: proto.py CANDIDATE [--scale N] [--page-size B] [--batch B]
  Replays the real first sync in time order: files indexed in walk order (file id order,
  batches of --batch observations per transaction: insert file, content, pending upload),
  uploads finishing in done_ms order (batches per transaction: upload -> done, object
  recorded). Measures the DB as built (incremental), then after VACUUM.
  --scale N synthesizes N copies (dirs d{k*1000+i}, names f{k*100000+j}, new sha256s,
  new inodes), copy k replayed after copy k-1.
Prints one JSON line per measurement and appends it to $WORK/results.jsonl; reads the rows
extract.py wrote to $WORK/data.pkl. Run through scripts/index-schema/run, which sets both.
The candidates (A: today's schema, B, C, Cp, Dm, E, En, F) are the classes below; their
measured sizes and what each changes are in docs/PERFORMANCE.md (second round, sixth session).
"""
import sqlite3, pickle, sys, os, json, hashlib, argparse, time

ap = argparse.ArgumentParser()
ap.add_argument('cand'); ap.add_argument('--scale', type=int, default=1)
ap.add_argument('--page-size', type=int, default=4096); ap.add_argument('--batch', type=int, default=500)
ap.add_argument('--keep', action='store_true')
args = ap.parse_args()

D = pickle.load(open(os.path.join(os.environ['WORK'], 'data.pkl'), 'rb'))
PENDING, DONE, FAILED = 0, 1, 2
METHODS = {'upload': 0, 'copy': 1, 'dedup': 2}

def split(p, sep):
    i = p.rindex(sep)
    return p[:i + 1], p[i + 1:]

# ---------------------------------------------------------------- candidates
class A:
    """Current schema (migrations 1-3 + 6 tables, as in /work/main/src/index.rs)."""
    ddl = """
CREATE TABLE files (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 BLOB NOT NULL, gen INTEGER NOT NULL,
  indexed_ms INTEGER NOT NULL, dev INTEGER NOT NULL DEFAULT 0);
CREATE TABLE contents (sha256 BLOB PRIMARY KEY, size INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE uploads (file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE, dest TEXT NOT NULL,
  key TEXT NOT NULL, sha256 BLOB NOT NULL, gen INTEGER NOT NULL, state INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT,
  permanent INTEGER NOT NULL DEFAULT 0, queued_ms INTEGER NOT NULL, done_ms INTEGER, method TEXT,
  PRIMARY KEY (file_id, dest)) WITHOUT ROWID;
CREATE INDEX uploads_queue ON uploads(dest, state, next_attempt_ms, queued_ms);
CREATE TABLE objects (dest TEXT NOT NULL, key TEXT NOT NULL, stored_key TEXT NOT NULL, sha256 BLOB NOT NULL,
  size INTEGER NOT NULL, stored_size INTEGER NOT NULL, pipeline TEXT NOT NULL, stored_ms INTEGER NOT NULL,
  PRIMARY KEY (dest, key)) WITHOUT ROWID;
CREATE INDEX objects_by_sha ON objects(dest, sha256, pipeline);
CREATE INDEX objects_by_stored_key ON objects(dest, stored_key);
CREATE TABLE index_totals (id INTEGER PRIMARY KEY CHECK (id = 1), files INTEGER NOT NULL, bytes INTEGER NOT NULL, contents INTEGER NOT NULL);
CREATE TABLE upload_totals (dest TEXT NOT NULL, state INTEGER NOT NULL, rows INTEGER NOT NULL, errors INTEGER NOT NULL, stale INTEGER NOT NULL, PRIMARY KEY (dest, state)) WITHOUT ROWID;
"""
    def __init__(s, c): s.c = c; s.ids = {}
    def file_and_content(s, f):
        """The file's row and its content's (A and B keep both as today); the file's id."""
        c = s.c
        c.execute("INSERT INTO files (path,size,mtime_ns,inode,sha256,gen,indexed_ms,dev) VALUES (?,?,?,?,?,1,?,?)",
                  (f['path'], f['size'], f['mtime'], f['inode'], f['sha'], f['now'], f['dev']))
        fid = c.lastrowid; s.ids[f['path']] = fid
        c.execute("INSERT OR IGNORE INTO contents VALUES (?,?,?)", (f['sha'], f['size'], f['now']))
        return fid
    def index(s, f):
        c = s.c; fid = s.file_and_content(f)
        c.execute("INSERT INTO uploads (file_id,dest,key,sha256,gen,state,attempts,next_attempt_ms,last_error,permanent,queued_ms) VALUES (?,?,?,?,1,0,0,0,NULL,0,?)",
                  (fid, 'primary', f['key'], f['sha'], f['now']))
    def done(s, u):
        c = s.c; fid = s.ids[u['path']]
        c.execute("UPDATE uploads SET state=1, done_ms=?, method=?, last_error=NULL, permanent=0 WHERE file_id=? AND dest=? AND gen=1 AND key=? AND sha256=?",
                  (u['now'], u['method'], fid, 'primary', u['key'], u['sha']))
        c.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?,?)",
                  ('primary', u['key'], u['stored_key'], u['sha'], u['size'], u['stored_size'], u['pipeline'], u['now']))

class B(A):
    """Same tables, small tweaks: dest/pipeline/method as small ints, uploads without key/sha256,
    partial queue index, stored_key NULL when = key + partial index."""
    ddl = """
CREATE TABLE dests (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE pipelines (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE files (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 BLOB NOT NULL, gen INTEGER NOT NULL,
  indexed_ms INTEGER NOT NULL, dev INTEGER NOT NULL DEFAULT 0);
CREATE TABLE contents (sha256 BLOB PRIMARY KEY, size INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE uploads (file_id INTEGER NOT NULL, dest INTEGER NOT NULL, gen INTEGER NOT NULL, state INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT,
  permanent INTEGER NOT NULL DEFAULT 0, queued_ms INTEGER NOT NULL, done_ms INTEGER, method INTEGER,
  PRIMARY KEY (file_id, dest)) WITHOUT ROWID;
CREATE INDEX uploads_queue ON uploads(dest, next_attempt_ms, queued_ms) WHERE state = 0;
CREATE TABLE objects (dest INTEGER NOT NULL, key TEXT NOT NULL, stored_key TEXT, sha256 BLOB NOT NULL,
  size INTEGER NOT NULL, stored_size INTEGER NOT NULL, pipeline INTEGER NOT NULL, stored_ms INTEGER NOT NULL,
  PRIMARY KEY (dest, key)) WITHOUT ROWID;
CREATE INDEX objects_by_sha ON objects(dest, sha256, pipeline);
CREATE INDEX objects_by_stored_key ON objects(dest, stored_key) WHERE stored_key IS NOT NULL;
INSERT INTO dests VALUES (1, 'primary'); INSERT INTO pipelines VALUES (0, 'none');
"""
    def index(s, f):
        c = s.c; fid = s.file_and_content(f)
        c.execute("INSERT INTO uploads (file_id,dest,gen,state,queued_ms) VALUES (?,1,1,0,?)", (fid, f['now']))
    def done(s, u):
        c = s.c; fid = s.ids[u['path']]
        c.execute("UPDATE uploads SET state=1, done_ms=?, method=?, last_error=NULL, permanent=0 WHERE file_id=? AND dest=1 AND gen=1",
                  (u['now'], METHODS[u['method']], fid))
        sk = None if u['stored_key'] == u['key'] else u['stored_key']
        c.execute("INSERT OR REPLACE INTO objects VALUES (1,?,?,?,?,?,0,?)",
                  (u['key'], sk, u['sha'], u['size'], u['stored_size'], u['now']))

NORM_COMMON = """
CREATE TABLE dests (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE pipelines (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE kdirs (id INTEGER PRIMARY KEY, prefix TEXT NOT NULL UNIQUE);   -- key prefix incl. trailing '/'
CREATE TABLE dirs (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, kdir INTEGER); -- kdir: key prefix of its files
CREATE TABLE files (id INTEGER PRIMARY KEY, dir INTEGER NOT NULL, name BLOB NOT NULL, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, dev INTEGER NOT NULL, content INTEGER NOT NULL,
  gen INTEGER NOT NULL, indexed_ms INTEGER NOT NULL, UNIQUE (dir, name));
INSERT INTO dests VALUES (1, 'primary'); INSERT INTO pipelines VALUES (0, 'none');
"""
CONTENTS_ID = """
CREATE TABLE contents (id INTEGER PRIMARY KEY, sha256 BLOB NOT NULL UNIQUE, size INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL);
"""
CONTENTS_PREFIX = """
-- id = first 6 bytes of sha256 as an integer (+1.. on a collision); no index on sha256:
-- lookup is WHERE id >= :p AND id < :p + 16 AND sha256 = :sha
CREATE TABLE contents (id INTEGER PRIMARY KEY, sha256 BLOB NOT NULL, size INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL);
"""
OBJECTS_NORM = """
CREATE TABLE objects (dest INTEGER NOT NULL, kdir INTEGER NOT NULL, name TEXT NOT NULL, stored_key TEXT,
  content INTEGER NOT NULL, size INTEGER NOT NULL, stored_size INTEGER NOT NULL, pipeline INTEGER NOT NULL,
  stored_ms INTEGER NOT NULL, PRIMARY KEY (dest, kdir, name)) WITHOUT ROWID;
CREATE INDEX objects_by_content ON objects(dest, content, pipeline);
CREATE INDEX objects_by_stored_key ON objects(dest, stored_key) WHERE stored_key IS NOT NULL;
"""

class C(A):
    """Normalized, uploads and objects separate: dirs + (dir, name); contents by integer id;
    dest/pipeline/method ints; object keys as (key-dir id, name); partial indexes."""
    ddl = NORM_COMMON + CONTENTS_ID + """
CREATE TABLE uploads (file_id INTEGER NOT NULL, dest INTEGER NOT NULL, gen INTEGER NOT NULL, state INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT,
  permanent INTEGER NOT NULL DEFAULT 0, queued_ms INTEGER NOT NULL, done_ms INTEGER, method INTEGER,
  PRIMARY KEY (file_id, dest)) WITHOUT ROWID;
CREATE INDEX uploads_queue ON uploads(dest, next_attempt_ms, queued_ms) WHERE state = 0;
""" + OBJECTS_NORM
    prefix_ids = False
    def __init__(s, c):
        super().__init__(c); s.dirs = {}; s.kdirs = {}; s.cids = {}
    def dir_id(s, d, kp):
        if d not in s.dirs:
            k = s.kdir_id(kp)
            s.c.execute("INSERT INTO dirs (path, kdir) VALUES (?,?)", (d, k)); s.dirs[d] = s.c.lastrowid
        return s.dirs[d]
    def kdir_id(s, kp):
        if kp not in s.kdirs:
            s.c.execute("INSERT INTO kdirs (prefix) VALUES (?)", (kp,)); s.kdirs[kp] = s.c.lastrowid
        return s.kdirs[kp]
    def content(s, sha, size, now):
        c = s.c
        if s.prefix_ids:
            p = int.from_bytes(sha[:6], 'big')
            r = c.execute("SELECT id FROM contents WHERE id >= ? AND id < ? + 16 AND sha256 = ?", (p, p, sha)).fetchone()
            if r: return r[0]
            i = p
            while c.execute("SELECT 1 FROM contents WHERE id = ?", (i,)).fetchone(): i += 1
            c.execute("INSERT INTO contents VALUES (?,?,?,?)", (i, sha, size, now)); return i
        r = c.execute("SELECT id FROM contents WHERE sha256 = ?", (sha,)).fetchone()
        if r: return r[0]
        c.execute("INSERT INTO contents (sha256, size, first_seen_ms) VALUES (?,?,?)", (sha, size, now))
        return c.lastrowid
    def insert_file(s, f):
        d, n = split(f['path'], b'/'); kp, kn = split(f['key'], '/')
        did = s.dir_id(d, kp)
        cid = s.content(f['sha'], f['size'], f['now']); s.cids[f['sha']] = cid
        s.c.execute("INSERT INTO files (dir,name,size,mtime_ns,inode,dev,content,gen,indexed_ms) VALUES (?,?,?,?,?,?,?,1,?)",
                    (did, n, f['size'], f['mtime'], f['inode'], f['dev'], cid, f['now']))
        fid = s.c.lastrowid; s.ids[f['path']] = fid
        return fid
    def index(s, f):
        fid = s.insert_file(f)
        s.c.execute("INSERT INTO uploads (file_id,dest,gen,state,queued_ms) VALUES (?,1,1,0,?)", (fid, f['now']))
    def done(s, u):
        c = s.c; fid = s.ids[u['path']]
        c.execute("UPDATE uploads SET state=1, done_ms=?, method=?, last_error=NULL, permanent=0 WHERE file_id=? AND dest=1 AND gen=1",
                  (u['now'], METHODS[u['method']], fid))
        kp, kn = split(u['key'], '/')
        sk = None if u['stored_key'] == u['key'] else u['stored_key']
        c.execute("INSERT OR REPLACE INTO objects VALUES (1,?,?,?,?,?,?,0,?)",
                  (s.kdir_id(kp), kn, sk, s.cids[u['sha']], u['size'], u['stored_size'], u['now']))

MERGED = """
-- one row per (file, destination): the upload state of the file's generation `gen`, and the
-- object the destination holds at the file's key (o_* NULL until one is stored). The key is
-- dirs.kdir's prefix + files.name unless key_kdir/key_name say otherwise.
CREATE TABLE uploads (file_id INTEGER NOT NULL, dest INTEGER NOT NULL, gen INTEGER NOT NULL, state INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT,
  permanent INTEGER NOT NULL DEFAULT 0, queued_ms INTEGER NOT NULL, done_ms INTEGER, method INTEGER,
  key_kdir INTEGER, key_name TEXT,               -- NULL: the key derived from the file's path
  o_content INTEGER, o_pipeline INTEGER,         -- the object stored at the key (NULL: none)
  o_stored_size INTEGER,                         -- NULL: = contents.size
  o_stored_ms INTEGER,                           -- NULL: = done_ms
  o_stored_key TEXT,                             -- NULL: = key
  PRIMARY KEY (file_id, dest)) WITHOUT ROWID;
CREATE INDEX uploads_queue ON uploads(dest, next_attempt_ms, queued_ms) WHERE state = 0;
CREATE INDEX uploads_by_key ON uploads(dest, key_kdir, key_name) WHERE key_name IS NOT NULL;
CREATE INDEX uploads_by_content ON uploads(dest, o_content, o_pipeline) WHERE o_content IS NOT NULL;
CREATE INDEX uploads_by_stored_key ON uploads(dest, o_stored_key) WHERE o_stored_key IS NOT NULL;
-- objects whose file row is gone (local cleanup, rebuild-index, key changed): full facts
""" + OBJECTS_NORM

class Dm(C):
    """Merged uploads+objects; key derived from the path (dirs.kdir + name); orphans in objects."""
    ddl = NORM_COMMON + CONTENTS_ID + MERGED
    def object_content(s, u):
        """What the merged row's o_content holds for a stored upload."""
        return s.cids[u['sha']]
    def done(s, u):
        c = s.c; fid = s.ids[u['path']]
        kp, kn = split(u['key'], '/'); _, n = split(u['path'], b'/')
        derived = (s.kdirs.get(kp) is not None and kn.encode() == n)
        sk = None if u['stored_key'] == u['key'] else u['stored_key']
        c.execute("""UPDATE uploads SET state=1, done_ms=?1, method=?2, last_error=NULL, permanent=0,
                     key_kdir=?4, key_name=?5, o_content=?6, o_pipeline=0,
                     o_stored_size=?7, o_stored_ms=NULL, o_stored_key=?8
                     WHERE file_id=?3 AND dest=1 AND gen=1""",
                  (u['now'], METHODS[u['method']], fid, None if derived else s.kdir_id(kp), None if derived else kn,
                   s.object_content(u), None if u['stored_size'] == u['size'] else u['stored_size'], sk))

class E(Dm):
    """Dm + contents id = first 6 bytes of sha256 (no sha256 index)."""
    ddl = NORM_COMMON + CONTENTS_PREFIX + MERGED
    prefix_ids = True

class Cp(C):
    """C + contents id = first 6 bytes of sha256 (no sha256 index)."""
    ddl = NORM_COMMON + CONTENTS_PREFIX + C.ddl.split(CONTENTS_ID)[1]
    prefix_ids = True

class En(E):
    """E without files.indexed_ms (written, never read in src/)."""
    ddl = E.ddl.replace("gen INTEGER NOT NULL, indexed_ms INTEGER NOT NULL, UNIQUE", "gen INTEGER NOT NULL, UNIQUE")
    def insert_file(s, f):
        d, n = split(f['path'], b'/'); kp, kn = split(f['key'], '/')
        did = s.dir_id(d, kp)
        cid = s.content(f['sha'], f['size'], f['now']); s.cids[f['sha']] = cid
        s.c.execute("INSERT INTO files (dir,name,size,mtime_ns,inode,dev,content,gen) VALUES (?,?,?,?,?,?,?,1)",
                    (did, n, f['size'], f['mtime'], f['inode'], f['dev'], cid))
        fid = s.c.lastrowid; s.ids[f['path']] = fid
        return fid

class F(En):
    """En + the merged row's object content NULL when it is the file's current content
    (dedup goes through an index files(content)); o_pipeline NOT NULL marks a stored object."""
    ddl = En.ddl + "\nCREATE INDEX files_by_content ON files(content);\n"
    def object_content(s, u):
        return None

CANDS = dict(F=F, A=A, B=B, C=C, Cp=Cp, Dm=Dm, E=E)

# ---------------------------------------------------------------- data + replay
def events(scale):
    files = D['files']; ups = {u[0]: u for u in D['uploads']}; objs = D['objects']
    span = 60000
    for k in range(scale):
        def tr_path(p):
            if k == 0: return p
            d, n = split(p, b'/'); dn = int(d.rstrip(b'/').split(b'/d')[-1]); fn = int(n[1:-4])
            return d[:d.rindex(b'/d') + 2] + str(k * 1000 + dn).encode() + b'/f' + str(k * 100000 + fn).encode() + b'.txt'
        def tr_key(key):
            if k == 0: return key
            d, n = split(key, '/'); dn = int(d.rstrip('/').split('/d')[-1]); fn = int(n[1:-4])
            return d[:d.rindex('/d') + 2] + str(k * 1000 + dn) + '/f' + str(k * 100000 + fn) + '.txt'
        tr_sha = (lambda h: h) if k == 0 else (lambda h: hashlib.sha256(h + bytes([k])).digest())
        ev = []
        for (fid, path, size, mtime, inode, sha, gen, ims, dev) in files:
            u = ups[fid]; o = objs[u[2]]
            p, key, h = tr_path(path), tr_key(u[2]), tr_sha(sha)
            ev.append((ims + k * span, 0, fid, dict(path=p, size=size, mtime=mtime + k * span * 10**6, inode=inode + k * 1000003,
                       sha=h, now=ims + k * span, dev=dev, key=key)))
            ev.append((u[11] + k * span, 1, fid, dict(path=p, key=key, sha=h, size=o[4], stored_size=o[5],
                       stored_key=key if o[2] == o[1] else o[2], pipeline=o[6], method=u[12], now=u[11] + k * span)))
        ev.sort(key=lambda e: (e[0], e[1], e[2]))
        yield from ev

def sizes(conn):
    ps = conn.execute("PRAGMA page_size").fetchone()[0]
    out = {n: s for n, s in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")}
    total = conn.execute("PRAGMA page_count").fetchone()[0] * ps
    free = conn.execute("PRAGMA freelist_count").fetchone()[0] * ps
    return out, total, free

def main():
    cls = CANDS[args.cand]
    path = os.path.join(os.environ['WORK'], f'db-{args.cand}-x{args.scale}-p{args.page_size}.sqlite3')
    for sfx in ('', '-wal', '-shm'):
        if os.path.exists(path + sfx): os.remove(path + sfx)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {args.page_size}")
    conn.execute("PRAGMA journal_mode = WAL"); conn.execute("PRAGMA synchronous = OFF")
    conn.executescript(cls.ddl)
    cur = conn.cursor(); cand = cls(cur)
    t0 = time.time(); n = 0; batch = []; kind = None
    def flush():
        cur.execute("BEGIN")
        for e in batch: (cand.index if e[1] == 0 else cand.done)(e[3])
        cur.execute("COMMIT")
    for e in events(args.scale):
        if batch and (e[1] != kind or len(batch) >= args.batch):
            flush(); batch = []
        kind = e[1]; batch.append(e); n += 1
    if batch: flush()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    nfiles = 100000 * args.scale
    res = []
    for phase in ('incremental', 'vacuumed'):
        if phase == 'vacuumed':
            conn.execute("VACUUM"); conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        per, total, free = sizes(conn)
        r = dict(cand=args.cand, scale=args.scale, page_size=args.page_size, batch=args.batch, phase=phase,
                 files=nfiles, total_bytes=total, free_bytes=free, bytes_per_file=round(total / nfiles, 1),
                 per_name_bytes_per_file={k: round(v / nfiles, 1) for k, v in sorted(per.items(), key=lambda x: -x[1]) if v / nfiles >= 0.05},
                 secs=round(time.time() - t0, 1))
        print(json.dumps(r)); res.append(r)
        with open(os.path.join(os.environ['WORK'], 'results.jsonl'), 'a') as fh: fh.write(json.dumps(r) + '\n')
    conn.close()
    if not args.keep: 
        for sfx in ('', '-wal', '-shm'):
            if os.path.exists(path + sfx): os.remove(path + sfx)

main()
