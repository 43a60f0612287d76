"""A seccomp filter for processes that parse untrusted content (the outside's content workers).

:func:`confine` installs a classic-BPF seccomp filter on every thread of the calling process
(``seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)``; it needs
``PR_SET_NO_NEW_PRIVS`` first, which it sets). It cannot be removed afterwards, and a later
filter can only narrow it.

The filter is a deny list: what a parser never needs and an exploit would want fails with
EPERM: creating sockets, running programs, creating processes (``clone`` without
``CLONE_THREAD``, ``fork``, ``vfork``; ``clone3`` fails with ENOSYS so that the C library falls
back to ``clone`` for threads), signalling or tracing other processes, namespaces and mounts,
kernel keyrings, BPF, io_uring, modules, changing ids or capabilities, clocks and reboot. A
system call of another ABI (i386 through ``int 0x80``, x32; 32-bit ARM on aarch64) fails with
EPERM too. Everything else
(files, memory, threads, the worker's pipes) works as before.

Tables: x86-64, and the architectures on the kernel's generic system call table (asm-generic:
aarch64 such as Kunpeng and Phytium servers, loongarch64, riscv64), which share one set of
numbers. On an architecture with no table (ppc64le, s390x...) :func:`confine` installs nothing
and says so, like a kernel without seccomp; the content pipeline then logs a warning (as for a
worker that could not leave the network). The numbers are checked against libseccomp's own
tables by tests/unit/test_seccomp.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import struct
from typing import Any

# linux/filter.h, linux/seccomp.h, linux/audit.h
_BPF_LD_W_ABS = 0x20
_BPF_JMP_JEQ_K = 0x15
_BPF_JMP_JGE_K = 0x35
_BPF_JMP_JSET_K = 0x45
_BPF_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data (args[0], low half: little endian)
_SET_MODE_FILTER = 1
_FLAG_TSYNC = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_THREAD = 0x00010000

_X86_64 = {
    "arch": 0xC000003E,  # AUDIT_ARCH_X86_64
    "x32_bit": 0x40000000,
    "seccomp": 317,
    "clone": 56,
    "clone3": 435,
    "deny": {
        # processes and programs
        "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
        # other processes
        "kill": 62, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "kcmp": 312, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
        # the network (the worker's pipes are not sockets)
        "socket": 41, "socketpair": 53,
        # namespaces, mounts, file handles
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "mknod": 133, "mknodat": 259,
        # kernel interfaces an exploit reaches for
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 250, "add_key": 248,
        "request_key": 249, "personality": 135, "syslog": 103,
        # ids and capabilities
        "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
        "setresuid": 117, "setresgid": 119, "capset": 126,
        # the machine
        "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168,
        "acct": 163, "quotactl": 179, "iopl": 172, "ioperm": 173, "sethostname": 170,
        "setdomainname": 171, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
        "clock_adjtime": 305,
    },
}  # fmt: skip

# The generic table (include/uapi/asm-generic/unistd.h) has no fork, vfork, mknod, iopl or
# ioperm (the C library makes them from clone and mknodat), and no x32-like second ABI.
_GENERIC_DENY = {
    # processes and programs
    "execve": 221, "execveat": 281,
    # other processes
    "kill": 129, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
    "kcmp": 272, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
    # the network
    "socket": 198, "socketpair": 199,
    # namespaces, mounts, file handles
    "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "name_to_handle_at": 264, "open_by_handle_at": 265, "mknodat": 33,
    # kernel interfaces an exploit reaches for
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 219, "add_key": 217,
    "request_key": 218, "personality": 92, "syslog": 116,
    # ids and capabilities
    "setuid": 146, "setgid": 144, "setreuid": 145, "setregid": 143, "setgroups": 159,
    "setresuid": 147, "setresgid": 149, "capset": 91,
    # the machine
    "reboot": 142, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
    "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225, "acct": 89,
    "quotactl": 60, "sethostname": 161, "setdomainname": 162, "settimeofday": 170,
    "clock_settime": 112, "adjtimex": 171, "clock_adjtime": 266,
}  # fmt: skip


def _generic(arch: int) -> dict[str, Any]:
    return {"arch": arch, "x32_bit": None, "seccomp": 277, "clone": 220, "clone3": 435,
            "deny": _GENERIC_DENY}  # fmt: skip


# AUDIT_ARCH_* = EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (all three little endian: the
# low half of args[0] is at offset 16)
TABLES: dict[str, dict[str, Any]] = {
    "x86_64": _X86_64,
    "aarch64": _generic(0xC00000B7),  # EM_AARCH64 183
    "riscv64": _generic(0xC00000F3),  # EM_RISCV 243
    "loongarch64": _generic(0xC0000102),  # EM_LOONGARCH 258
}


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program(table: dict[str, Any]) -> bytes:
    """The filter for one architecture's table, as the kernel takes it (sock_filter[])."""
    eperm = _RET_ERRNO | errno.EPERM
    deny = sorted(set(table["deny"].values()))
    ops = [
        _op(_BPF_LD_W_ABS, _OFF_ARCH),
        _op(_BPF_JMP_JEQ_K, table["arch"], jt=1),  # another ABI (i386, 32-bit ARM): refused
        _op(_BPF_RET_K, eperm),
        _op(_BPF_LD_W_ABS, _OFF_NR),
    ]
    if table["x32_bit"] is not None:
        ops += [
            _op(_BPF_JMP_JGE_K, table["x32_bit"], jf=1),  # x32 numbers: refused
            _op(_BPF_RET_K, eperm),
        ]
    ops += [
        _op(_BPF_JMP_JEQ_K, table["clone3"], jf=1),
        _op(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS),
        _op(_BPF_JMP_JEQ_K, table["clone"], jf=4),
        _op(_BPF_LD_W_ABS, _OFF_ARG0),  # clone: a thread, or nothing
        _op(_BPF_JMP_JSET_K, _CLONE_THREAD, jt=1),
        _op(_BPF_RET_K, eperm),
        _op(_BPF_RET_K, _RET_ALLOW),
    ]
    # one compare per denied number, each jumping to the shared refusal at the end
    for i, nr in enumerate(deny):
        ops.append(_op(_BPF_JMP_JEQ_K, nr, jt=len(deny) - i))
    ops += [_op(_BPF_RET_K, _RET_ALLOW), _op(_BPF_RET_K, eperm)]
    return b"".join(ops)


def confine() -> str:
    """Install the filter on every thread of this process; returns ``"filter"``, or
    ``"none: <why>"`` when it could not (another architecture, no seccomp in the kernel)."""
    table = TABLES.get(platform.machine())
    if table is None:
        return f"none: no system call table for {platform.machine()}"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"none: PR_SET_NO_NEW_PRIVS failed ({errno.errorcode.get(ctypes.get_errno())})"
    code = program(table)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _Prog(len(code) // 8, ctypes.addressof(buf))
    args = (
        ctypes.c_long(table["seccomp"]),
        ctypes.c_long(_SET_MODE_FILTER),
        ctypes.c_long(_FLAG_TSYNC),
    )
    if libc.syscall(*args, ctypes.byref(prog)) != 0:  # (longs: syscall(2) is variadic)
        err = ctypes.get_errno()
        return f"none: seccomp refused ({errno.errorcode.get(err, err)})"
    return "filter"
