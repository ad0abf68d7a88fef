"""What the fork server's parts and the host share: the frame format, prctl and tree removal.

    from privcode.sandbox.server.common import pack_frame, read_frame, remove_tree   # on the host

Standard library only, like every part of privcode.sandbox.server (the host sends their text into
the sandbox; see privcode/sandbox/server/__init__.py).
"""
import json
import os
import shutil
import stat
import struct

try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
except Exception:  # pragma: no cover - ctypes missing in a stripped image
    ctypes = _libc = None


PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
MAX_FRAME = 256 * 1024 * 1024



def prctl(op, arg, arg2=0):
    if _libc is None:
        return -1
    return _libc.prctl(op, arg, arg2, 0, 0)


def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def frame_length(head):
    """The body length a frame's 4-byte head announces; ValueError beyond MAX_FRAME (the host's
    reader, privcode.sandbox.forkserver, uses it too)."""
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ValueError("frame too large")
    return n


def pack_frame(obj):
    """One frame: a 4-byte big-endian length + UTF-8 JSON."""
    data = json.dumps(obj).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def read_frame(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    body = read_exact(fd, frame_length(head))
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(fd, obj):
    view = memoryview(pack_frame(obj))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def remove_tree(path):
    """Remove `path` (a file or a whole tree; a missing one is fine), fixing permissions that a
    snippet took away -- below `path` only, never its parent. Returns the first failure in words, or
    None. The host removes a worker's directory with it too (privcode.sandbox.forkserver)."""
    root = os.path.abspath(path)
    errors = []

    def attempt(fn, p):
        try:
            fn(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append("cannot remove %s: %s" % (p, e))

    def fix_and_remove(p):
        parent = os.path.dirname(p)
        if parent == root or parent.startswith(root + "/"):
            os.chmod(parent, 0o700)
        if p != root and os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
            shutil.rmtree(p)
        else:
            (os.unlink if p != root else os.rmdir)(p)

    def onerror(fn, p, exc):
        if not isinstance(exc[1], FileNotFoundError):
            attempt(fix_and_remove, os.path.abspath(p))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        shutil.rmtree(path, onerror=onerror)
    else:
        attempt(os.unlink, path)
    return errors[0] if errors else None
