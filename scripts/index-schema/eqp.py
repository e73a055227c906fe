# EXPLAIN QUERY PLAN of the key access paths on the smallest schema (F = En + files_by_content), with 100k-like stats.
import importlib.util, os, sqlite3, sys
sys.argv = ['proto.py', 'En']
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'proto.py')).read().split('# ---------------------------------------------------------------- data + replay')[0]
ns = {}; exec(compile(src.replace("D = pickle.load", "D = None and pickle.load").replace("args = ap.parse_args()", "args = None"), 'proto', 'exec'), ns)
ddl = ns['F'].ddl + "\nCREATE INDEX dirs_by_kdir ON dirs(kdir);\n"
c = sqlite3.connect(':memory:'); c.executescript(ddl)
# stats resembling 100k files / 1000 dirs / one destination so the planner sees realistic sizes
c.executescript("""ANALYZE; DELETE FROM sqlite_stat1;
INSERT INTO sqlite_stat1 VALUES ('files','sqlite_autoindex_files_1','100000 100 1'),('files',NULL,'100000'),
 ('dirs','sqlite_autoindex_dirs_1','1000 1'),('dirs','dirs_by_kdir','1000 1'),('kdirs','sqlite_autoindex_kdirs_1','1000 1'),
 ('contents',NULL,'100000'),('files','files_by_content','100000 1'),('uploads','uploads','100000 100000 1'),('uploads','uploads_queue','10 10 1 1'),
 ('uploads','uploads_by_content','100000 100000 1 1'),('uploads','uploads_by_key','1000 1000 1 1'),('uploads','uploads_by_stored_key','1 1 1'),
 ('objects','objects','1000 1000 2 1'),('objects','objects_by_content','1000 1000 1 1'),('objects','objects_by_stored_key','1 1 1');
ANALYZE sqlite_schema;""")
Q = {
 'exact lookup by path (lookup_many/unchanged/apply get)':
   "SELECT f.id, f.size, f.mtime_ns, f.inode, f.dev, f.gen, f.content FROM dirs d JOIN files f ON f.dir = d.id AND f.name = :name WHERE d.path = :dir",
 'directory range scan, recursive (FILES_UNDER: run dir and everything below)':
   """SELECT d.path, f.name, f.size, f.mtime_ns, c.sha256,
        (SELECT group_concat(u.dest, char(10)) FROM uploads u WHERE u.file_id = f.id AND u.state = 1 AND u.gen = f.gen)
      FROM dirs d JOIN files f ON f.dir = d.id JOIN contents c ON c.id = f.content
      WHERE d.path = :run OR (d.path >= :run_slash AND d.path < :run_zero)""",
 'files directly in one dir (files_in_dir: no more skipping subdirectories)':
   "SELECT f.name, f.size, f.mtime_ns, f.inode, f.dev FROM files f WHERE f.dir = (SELECT id FROM dirs WHERE path = :dir) ORDER BY f.name",
 'ordered iteration (paths_from, order is (dir path, name), cursor = (dir path, name))':
   """SELECT d.path, f.name FROM dirs d JOIN files f ON f.dir = d.id
      WHERE d.path > :dir OR (d.path = :dir AND f.name > :name) ORDER BY d.path, f.name LIMIT 1000""",
 'claim from the queue (CLAIM, literal state 0)':
   """SELECT u.file_id, u.gen, d.path, f.name, k.prefix, c.sha256, f.size, f.mtime_ns, f.inode, u.attempts, u.queued_ms, f.dev
      FROM uploads u JOIN files f ON f.id = u.file_id JOIN dirs d ON d.id = f.dir LEFT JOIN kdirs k ON k.id = d.kdir
      JOIN contents c ON c.id = f.content
      WHERE u.dest = :dest AND u.state = 0 AND u.next_attempt_ms <= :now AND u.attempts < :max AND u.gen = f.gen
      ORDER BY u.next_attempt_ms, u.queued_ms LIMIT 64""",
 'NEXT_DUE': "SELECT next_attempt_ms FROM uploads WHERE dest = :dest AND state = 0 AND next_attempt_ms > :now ORDER BY next_attempt_ms LIMIT 1",
 'OLDEST_PENDING': "SELECT min(queued_ms) FROM uploads WHERE dest = :dest AND state = 0",
 'object by (dest, key) = (prefix, name): derived key, explicit key, orphan':
   """SELECT u.file_id, u.o_content, u.o_pipeline FROM kdirs k JOIN dirs d ON d.kdir = k.id
        JOIN files f ON f.dir = d.id AND f.name = CAST(:name AS BLOB)
        JOIN uploads u ON u.file_id = f.id AND u.dest = :dest
      WHERE k.prefix = :prefix AND u.key_name IS NULL AND u.o_content IS NOT NULL
      UNION ALL
      SELECT u.file_id, u.o_content, u.o_pipeline FROM kdirs k JOIN uploads u
        ON u.dest = :dest AND u.key_kdir = k.id AND u.key_name = :name
      WHERE k.prefix = :prefix AND u.key_name IS NOT NULL AND u.o_content IS NOT NULL
      UNION ALL
      SELECT NULL, o.content, o.pipeline FROM kdirs k JOIN objects o ON o.dest = :dest AND o.kdir = k.id AND o.name = :name
      WHERE k.prefix = :prefix""",
 'object by (dest, stored_key) (FORGET_STORED; stored_key NULL = key, so also look up as key)':
   """SELECT file_id FROM uploads WHERE dest = :dest AND o_stored_key = :sk AND o_stored_key IS NOT NULL
      UNION ALL SELECT NULL FROM objects WHERE dest = :dest AND stored_key = :sk AND stored_key IS NOT NULL""",
 'content id by sha256 (contents: id = first 6 bytes, probing)':
   "SELECT id FROM contents WHERE id >= :p AND id < :p + 16 AND sha256 = :sha",
 'object by (dest, content, pipeline) (OBJECT_WITH)':
   """SELECT u.file_id FROM uploads u WHERE u.dest = :dest AND u.o_content = :cid AND u.o_pipeline = :pl AND u.o_content IS NOT NULL
      UNION ALL SELECT NULL FROM objects o WHERE o.dest = :dest AND o.content = :cid AND o.pipeline = :pl LIMIT 1""",
 'object by (dest, content, pipeline) on schema F (o_content NULL = the current content of the file)':
   """SELECT u.file_id FROM files f JOIN uploads u ON u.file_id = f.id AND u.dest = :dest
        WHERE f.content = :cid AND u.o_content IS NULL AND u.o_pipeline = :pl
      UNION ALL SELECT u.file_id FROM uploads u WHERE u.dest = :dest AND u.o_content = :cid AND u.o_pipeline = :pl AND u.o_content IS NOT NULL
      UNION ALL SELECT NULL FROM objects o WHERE o.dest = :dest AND o.content = :cid AND o.pipeline = :pl LIMIT 1""",
 'latencies (LATENCIES, scan as today)':
   "SELECT done_ms - queued_ms FROM uploads WHERE dest = :dest AND state = 1 AND done_ms IS NOT NULL ORDER BY 1",
 'contents count': "SELECT count(*) FROM contents",
}
for name, q in Q.items():
    print('###', name); print('```sql'); print(' '.join(q.split())); print('```'); print('```')
    for r in c.execute('EXPLAIN QUERY PLAN ' + q, {k: None for k in ['name','dir','run','run_slash','run_zero','dest','now','max','prefix','sk','p','sha','cid','pl']}):
        print('  ' * 0 + '|' + '--' * 1 + r[3])
    print('```')
