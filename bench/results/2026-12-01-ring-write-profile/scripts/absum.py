import csv,glob,collections,statistics,os,sys
base=sys.argv[1] if len(sys.argv)>1 else '/var/tmp/rw/ab'
rows=collections.defaultdict(list)
for f in sorted(glob.glob(base+'/*-*/ring.csv')):
    cfg=os.path.basename(os.path.dirname(f)).split('-')[0]
    for r in csv.DictReader(open(f)):
        if r['error']: continue
        iops=float(r['iops']); 
        rows[(cfg,r['job'],r['path'])].append((float(r['value']),float(r['server_cpu_pct'])/100/iops*1e6,float(r['client_cpu_pct'])/100/iops*1e6, r['ratio_to_nbd']))
for job in ('seqwrite','randwrite'):
    print('==',job)
    for cfg in ('A','C','B'):
        for path in ('nbd','ring'):
            v=rows.get((cfg,job,path),[])
            if not v: continue
            print(f"  {cfg} {path:4} value {' '.join(f'{x[0]:.0f}' for x in v):28} median {statistics.median(x[0] for x in v):8.0f}  server us/io median {statistics.median(x[1] for x in v):6.1f}  client us/io {statistics.median(x[2] for x in v):6.1f}" + (f"  ratios {' '.join(x[3][:4] for x in v)}" if path=='ring' else ''))
