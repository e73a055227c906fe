# Markdown tables from results.jsonl (last result per candidate/scale/page size/phase).
import json, os
R = {}
for l in open(os.path.join(os.environ['WORK'], 'results.jsonl')):
    r = json.loads(l); R[(r['cand'], r['scale'], r['page_size'], r['phase'])] = r
order = ['A', 'B', 'C', 'Cp', 'Dm', 'E', 'En', 'F']
def g(c, s, p, ph):
    r = R.get((c, s, p, ph)); return '—' if r is None else f"{r['bytes_per_file']:.1f}"
print('| candidate | 100k incremental | 100k vacuumed | 1M incremental | 1M vacuumed |')
print('|---|---:|---:|---:|---:|')
for c in order:
    print(f"| {c} | {g(c,1,4096,'incremental')} | {g(c,1,4096,'vacuumed')} | {g(c,10,4096,'incremental')} | {g(c,10,4096,'vacuumed')} |")
print()
for c in order:
    for s in (1, 10):
        for ph in ('incremental', 'vacuumed'):
            r = R.get((c, s, 4096, ph))
            if not r: continue
            per = ', '.join(f"{k} {v}" for k, v in r['per_name_bytes_per_file'].items() if v >= 0.5)
            free = r['free_bytes'] / r['files']
            print(f"- **{c}** {'100k' if s == 1 else '1M'} {ph}: {r['bytes_per_file']} B/file = {per}" + (f", freelist {free:.1f}" if free >= 0.5 else ''))
