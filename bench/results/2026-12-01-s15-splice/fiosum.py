import json, sys
label, rw, bs, cpu = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t = sys.stdin.read(); d = json.loads(t[t.find("{"):])["jobs"][0]
s = d["write" if rw.endswith("write") else "read"]
client = d["usr_cpu"] + d["sys_cpu"]
if bs == "4k":
    print(f"{label} {s['iops']:.0f} IOPS {cpu*1e6/max(1, s['total_ios']):.1f} us/op server {cpu/4*100:.0f}% client {client:.0f}%")
else:
    mib = s["io_bytes"] / 2**20
    print(f"{label} {mib/4:.0f} MiB/s {cpu*1e6/mib:.0f} us/MiB server {cpu/4*100:.0f}% client {client:.0f}%")
