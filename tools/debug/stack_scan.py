#!/usr/bin/env python3
"""Guesses the user-space call chain of a thread that no signal reaches (a
killable userfault wait): reads its stack through /proc/PID/mem from the
stack pointer in /proc/PID/task/TID/syscall and resolves every word that
points into BINARY's code.  Stale frames show up too; read from the top.

    stack_scan.py PID TID BINARY
"""
import struct
import subprocess
import sys

pid, tid, binary = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
name = binary.split("/")[-1]
fields = open(f"/proc/{pid}/task/{tid}/syscall").read().split()
if len(fields) < 3:
    sys.exit(f"thread {tid} is running, not in a syscall: signal it instead")
sp = int(fields[-2], 16)
code = []
for line in open(f"/proc/{pid}/maps"):
    parts = line.split()
    if len(parts) > 5 and parts[5].endswith(name):
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        code.append((lo, hi, parts[1], int(parts[2], 16)))
base = min(lo - off for lo, hi, perm, off in code)
with open(f"/proc/{pid}/mem", "rb") as mem:
    mem.seek(sp)
    stack = mem.read(32768)
addrs = []
for i in range(0, len(stack) - 8, 8):
    word = struct.unpack_from("<Q", stack, i)[0]
    if any(lo <= word < hi and "x" in perm for lo, hi, perm, off in code):
        addrs.append(hex(word - base - 1))
out = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + addrs, capture_output=True, text=True).stdout
lines = out.splitlines()
for i in range(0, len(lines) - 1, 2):
    print(lines[i][:120], lines[i + 1])
