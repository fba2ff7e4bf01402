import json,sys,collections
d=json.load(open(sys.argv[1])); n=int(sys.argv[2]) if len(sys.argv)>2 else 25
frames=d['shared']['frames']
for p in d['profiles']:
    tot=sum(p['weights']); 
    if tot==0: continue
    selfc=collections.Counter(); incl=collections.Counter()
    for s,w in zip(p["samples"],p["weights"]):
        if not s: continue
        selfc[s[-1]]+=w
        for f in set(s): incl[f]+=w
    print('== thread',p['name'],'samples',tot)
    def nm(i):
        f=frames[i]; return f"{f['name']} ({(f.get('file') or '').split('/')[-1]}:{f.get('line')})"
    print(' self:'); [print(f"  {w/tot*100:5.1f}% {nm(i)}") for i,w in selfc.most_common(n)]
    print(' incl:'); [print(f"  {w/tot*100:5.1f}% {nm(i)}") for i,w in incl.most_common(n)]
