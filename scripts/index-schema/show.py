import sys,json
for l in sys.stdin:
  try: r=json.loads(l); print(r['cand'],'x%d'%r['scale'],'p%d'%r['page_size'],r['phase'],r['bytes_per_file'],r['per_name_bytes_per_file'],r['secs'])
  except Exception: print(l.strip())
