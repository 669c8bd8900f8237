"""``python mdwe_exec.py PROGRAM ARGS...``: set the W^X rule systemd's MemoryDenyWriteExecute=
relies on, then exec PROGRAM.

``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`` (Linux 6.3+): from now on this process and
everything it execs cannot map memory writable and executable, nor make writable memory
executable (mmap/mprotect fail with EACCES). systemd implements MemoryDenyWriteExecute= with a
seccomp filter of the same effect; the prctl is the kernel's own form of it, usable without
systemd. Exit status 3 if the kernel refuses the prctl.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        sys.exit(3)
    os.execv(sys.argv[1], sys.argv[1:])  # noqa: S606 - exec-ing its argv is its job


if __name__ == "__main__":
    main()
