"""How ctxtrain's processes find each other on this machine and die together: the loopback interface, a free
port on it, and a child that dies with its parent.

No torch, no Ray: the driver, the local launcher's workers and the data loader's workers all use these.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import Optional

PR_SET_PDEATHSIG = 1


def _loopback_interface() -> dict[str, str]:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    lo = next((n for n in ("lo", "lo0") if n in names), None)
    return {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo} if lo else {}


# A process group of one machine's workers: gloo's pairs and NCCL's bootstrap sockets bind to the loopback
# interface (NCCL moves the data itself over NVLink or shared memory).
LOOPBACK_ENV = _loopback_interface()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies, even a SIGKILLed parent (Linux's
    PR_SET_PDEATHSIG): an orphaned worker would go on writing into a run directory, or hold a dead rank's
    sockets open so that Ray notices the death only after minutes of timeouts. A parent that died before the
    call (this process is no longer parent_pid's child, or was handed to init) means exiting now."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.getppid()
    if parent == 1 or (parent_pid is not None and parent != parent_pid):
        os._exit(1)
