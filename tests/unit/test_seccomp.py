"""The seccomp filter's tables and program, for every architecture it has a table for.

The kernel test (tests/unit/test_content_worker.py) can only run this machine's table; here
each table's numbers are checked against libseccomp's own tables (the library systemd and
container runtimes use), and each table's program is run by a small classic-BPF interpreter
on the seccomp_data the kernel would give it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import struct

import pytest

from ferry import seccomp

RET_ALLOW = 0x7FFF0000
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS
CLONE_THREAD = 0x00010000
THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes to clone
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD (fork())
ALLOWED = ["read", "write", "openat", "close", "mmap", "munmap", "futex", "exit_group",
           "rt_sigaction", "pread64", "lseek", "getpid", "madvise", "brk"]  # fmt: skip


def libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp")
    assert name, "libseccomp is needed for this test (Debian: libseccomp2, which apt needs)"
    lib = ctypes.CDLL(name)
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    return lib


def resolve(arch: str, name: str) -> int:
    lib = libseccomp()
    token = lib.seccomp_arch_resolve_name(arch.encode())
    assert token, f"libseccomp does not know {arch}"
    nr: int = lib.seccomp_syscall_resolve_name_arch(token, name.encode())
    assert nr >= 0, f"{name} is not a system call on {arch}"
    return nr


def run(prog: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """Classic BPF, the instructions seccomp.program uses, on one struct seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ops = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    for _ in range(len(ops)):  # only forward jumps: each instruction runs at most once
        code, jt, jf, k = ops[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # BPF_JMP | JEQ / JGE / JSET, with K
            hit = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if hit else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"instruction {code:#x} at {pc}")
    raise AssertionError("the program ran off its end")


# libseccomp 2.5 has no LoongArch table; LoongArch uses the generic numbers unchanged
CHECKED_BY_LIBSECCOMP = {"x86_64": "x86_64", "aarch64": "aarch64", "riscv64": "riscv64"}


@pytest.mark.parametrize("machine", sorted(CHECKED_BY_LIBSECCOMP))
def test_numbers_are_libseccomps(machine: str) -> None:
    table, arch = seccomp.TABLES[machine], CHECKED_BY_LIBSECCOMP[machine]
    assert table["arch"] == libseccomp().seccomp_arch_resolve_name(arch.encode())
    for name in ("seccomp", "clone", "clone3"):
        assert table[name] == resolve(arch, name), name
    wrong = {n: nr for n, nr in table["deny"].items() if resolve(arch, n) != nr}
    assert not wrong, f"numbers that are not {arch}'s: {wrong}"


def test_generic_tables_deny_the_same_calls_as_x86_64() -> None:
    """The generic table names every call x86-64's does, except those it does not have."""
    x86 = set(seccomp.TABLES["x86_64"]["deny"])
    lib = libseccomp()
    token = lib.seccomp_arch_resolve_name(b"aarch64")
    absent = {n for n in x86 if lib.seccomp_syscall_resolve_name_arch(token, n.encode()) < 0}
    assert absent == {"fork", "vfork", "mknod", "iopl", "ioperm"}
    for machine in ("aarch64", "riscv64", "loongarch64"):
        assert set(seccomp.TABLES[machine]["deny"]) == x86 - absent, machine
    assert seccomp.TABLES["loongarch64"]["arch"] == 258 | 0x80000000 | 0x40000000


@pytest.mark.parametrize("machine", sorted(seccomp.TABLES))
def test_program(machine: str) -> None:
    table = seccomp.TABLES[machine]
    prog, arch = seccomp.program(table), table["arch"]
    assert len(prog) % 8 == 0
    assert len(prog) // 8 <= 4096  # BPF_MAXINSNS
    numbers = CHECKED_BY_LIBSECCOMP.get(machine, "aarch64")
    for name, nr in table["deny"].items():
        assert run(prog, nr, arch) == EPERM, name
    for name in ALLOWED:
        assert run(prog, resolve(numbers, name), arch) == RET_ALLOW, name
    assert run(prog, table["clone"], arch, THREAD_FLAGS) == RET_ALLOW
    assert run(prog, table["clone"], arch, FORK_FLAGS) == EPERM
    assert run(prog, table["clone3"], arch) == ENOSYS
    # the same numbers from another ABI: refused, even those allowed in this one
    for other in {t["arch"] for t in seccomp.TABLES.values()} | {0x40000003, 0x40000028}:
        if other != arch:
            assert run(prog, resolve(numbers, "read"), other) == EPERM, hex(other)
    if table["x32_bit"] is not None:
        assert run(prog, table["x32_bit"] | resolve(numbers, "getpid"), arch) == EPERM
