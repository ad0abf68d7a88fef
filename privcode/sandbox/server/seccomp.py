"""The template's seccomp filter: kernel keyring calls refused, setpriority/ioprio_set only aimed
at one process, every syscall of a foreign ABI refused (see privcode/sandbox/server/__init__.py).

    prog = seccomp_program()            # BPF bytes for this machine, or None
    install = seccomp_installer(prog)   # built before the template forks; install() in the template
"""
import os
import struct

from .common import PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, _libc, ctypes

# audit arch, first foreign-ABI syscall number (x32) or None, syscall numbers
_ARCH = {
    "x86_64": (0xC000003E, 0x40000000, dict(add_key=248, request_key=249, keyctl=250, setpriority=141,
                                            ioprio_set=251, ioprio_get=252)),
    "aarch64": (0xC00000B7, None, dict(add_key=217, request_key=218, keyctl=219, setpriority=140,
                                       ioprio_set=30, ioprio_get=31)),
}
_DENY = ("add_key", "request_key", "keyctl")
# allowed only when these (argument, value) pairs hold: aimed at one process (or thread), not at a
# process group or at every process of the uid (PRIO_USER / IOPRIO_WHO_USER reach the whole host)
_ONLY = {"setpriority": ((0, 0),),  # PRIO_PROCESS
         "ioprio_set": ((0, 1),)}   # IOPRIO_WHO_PROCESS


def seccomp_program():
    """The BPF filter (bytes) for this machine, or None where the architecture is unknown."""
    arch = _ARCH.get(os.uname().machine)
    if arch is None:
        return None
    audit, x32, nr = arch
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = []  # (code, jt, jf, k); jt/jf may be the labels "eperm"/"nosys"

    def ld(off):
        prog.append((LD, 0, 0, off))
    ld(4)
    prog.append((JEQ, 0, "nosys", audit))
    ld(0)
    if x32 is not None:
        prog.append((JGE, "nosys", 0, x32))
    for name in _DENY:
        prog.append((JEQ, "eperm", 0, nr[name]))
    for name, conds in _ONLY.items():
        prog.append((JEQ, 0, 2 * len(conds) + 1, nr[name]))  # not this syscall: skip its block
        for arg, value in conds:
            ld(16 + 8 * arg)  # low 32 bits of the argument (little endian)
            prog.append((JEQ, 0, "eperm", value))
        prog.append((RET, 0, 0, ALLOW))
    prog.append((RET, 0, 0, ALLOW))
    labels = {"eperm": len(prog), "nosys": len(prog) + 1}
    prog += [(RET, 0, 0, EPERM), (RET, 0, 0, ENOSYS)]
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("HBBI", code, jt, jf, k)
    return out


def seccomp_installer(prog):
    """A function that installs `prog` in the calling process; everything it needs is built now,
    before the template forks (a child then touches as little of the template's memory as it can)."""
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(prog)
    ref = ctypes.byref(Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p)))
    call, get_errno = _libc.prctl, ctypes.get_errno

    def install():
        call(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if call(PR_SET_SECCOMP, 2, ref, 0, 0) != 0:
            raise OSError(get_errno(), "seccomp: " + os.strerror(get_errno()))
    install.keep = (buf, ref)
    return install
