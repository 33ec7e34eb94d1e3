#!/usr/bin/env python3
"""Sums `perf report` self-time lines into the parts of the README table
("Third round: the real CPU, profiled"). Arguments: perf.data files, or text
files saved from `perf report --no-children --sort comm,dso,symbol --stdio -g none`."""
import re,subprocess,sys,collections
def rows(f):
    if f.endswith(".txt"):
        out=open(f).read()
    else:
        out=subprocess.run(["perf","report","-i",f,"--no-children","--sort","comm,dso,symbol","--stdio","-g","none","--percent-limit","0"],capture_output=True,text=True).stdout
    for l in out.splitlines():
        m=re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s+-\s+-\s*$",l) or re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)$",l)
        if m: yield float(m.group(1)),m.group(2),m.group(3),m.group(5).strip()
G=[("sled threads (sled-io, flusher)",lambda c,d,s: not c.startswith("tokio-rt")),
("kernel: context switch, wake-up, futex, sched_yield",lambda c,d,s: d.startswith("[kernel") and re.search(r"finish_task_switch|_raw_spin_unlock_irq|futex|__schedule|try_to_wake|wake_up|sched_yield|schedule|ttwu|select_task_rq|enqueue|dequeue|update_curr|pick_next|psi_",s)),
("kernel: TCP/socket, epoll, other syscalls",lambda c,d,s: d.startswith("[kernel")),
("libc malloc/free",lambda c,d,s: "libc" in d and re.search(r"malloc|free|unlink_chunk|_int_|consolidate|tcache",s)),
("libc memmove/memcmp/memset",lambda c,d,s: "libc" in d and re.search(r"mem",s)),
("libc other (syscall stubs, locks)",lambda c,d,s: "libc" in d or "vdso" in d or "libm" in d),
("SHA-256 / HMAC (ring)",lambda c,d,s: re.search(r"sha256|sha2|hmac|digest",s,re.I)),
("AES-GCM (ring)",lambda c,d,s: re.search(r"aes|gcm|ghash|aead",s,re.I)),
("rustls records",lambda c,d,s: s.startswith("<rustls") or "rustls" in s),
("keyward audit",lambda c,d,s: "keyward::audit" in s),
("keyward anomaly",lambda c,d,s: "keyward::anomaly" in s),
("keyward other (handler, seam, token, secrets, read set, metrics)",lambda c,d,s: "keyward" in s),
("sled (reads)",lambda c,d,s: "sled" in s or "crossbeam" in s),
("h2/hyper/tonic/http/bytes/prost",lambda c,d,s: re.search(r"h2::|hyper|tonic|http::|bytes::|prost|slab|tower|indexmap|hashbrown",s)),
("tokio runtime",lambda c,d,s: "tokio" in s or "mio" in s),
("other user space",lambda c,d,s: True)]
res={}
for f in sys.argv[1:]:
    acc=collections.OrderedDict((g,0.0) for g,_ in G); tot=0
    for p,c,d,s in rows(f):
        tot+=p
        for g,fn in G:
            if fn(c,d,s): acc[g]+=p; break
    res[f]=(acc,tot)
print("| part | "+" | ".join(sys.argv[1:])+" |")
for g,_ in G: print("| "+g+" | "+" | ".join("%.1f %%"%res[f][0][g] for f in sys.argv[1:])+" |")
print("| total | "+" | ".join("%.1f"%res[f][1] for f in sys.argv[1:])+" |")
