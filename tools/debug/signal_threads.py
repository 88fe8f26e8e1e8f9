#!/usr/bin/env python3
"""Sends SIGURG to every thread of PID (see backtrace_on_signal.c)."""
import ctypes
import os
import sys

SYS_TGKILL = 234  # x86_64
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
for tid in os.listdir(f"/proc/{pid}/task"):
    libc.syscall(SYS_TGKILL, pid, int(tid), 23)  # SIGURG
