"""Probes run by tests/test_systemd_unit.py; each prints one JSON object.

`python sandbox_probe.py inside`: run as the service under the whole sandbox (tests/sandbox.py):
what the process is (uid, capabilities, no_new_privs, seccomp), what it can see and write, which
sockets it can open, and that everything the daemon loads still loads and works.

`python sandbox_probe.py filters SPEC SCRATCH`: run as root in throw-away namespaces; for each
seccomp-backed directive of the unit, forks twice and makes one call that root may make: once
without a filter, once under that directive's filter alone. A filter that bites changes the
result (to EPERM, EAFNOSUPPORT, ENOSYS or death by SIGSYS).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = (ctypes.c_long,) + (ctypes.c_void_p,) * 5


def outcome(call) -> str:
    """'ok' or the errno name: from an OSError, or from a libc call returning -1."""
    try:
        result = call()
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err.errno))
    if isinstance(result, int) and result == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "ok"


def open_socket(family: int, kind: int = socket.SOCK_STREAM) -> None:
    socket.socket(family, kind).close()


def status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    keys = ("NoNewPrivs", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Seccomp", "Seccomp_filters")
    return {k: fields.get(k, "").strip() for k in keys}


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str) -> str:
    def go() -> None:
        with open(path, "w") as f:
            f.write("probe")
    return outcome(go)


def inside() -> dict:
    import mmap
    import threading

    out: dict = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "status": status(),
                 "cwd": os.getcwd(), "env": dict(os.environ)}
    # File system.
    out["write"] = {p: write(p) for p in ("/etc/gateway-probe", "/usr/gateway-probe", "/var/gateway-probe",
                                          "/etc/gateway/gateway.yaml", "/proc/sys/kernel/hostname",
                                          "/sys/gateway-probe", "/sys/fs/cgroup/gateway-probe",
                                          "/run/lock/gateway-probe", "/dev/shm/gateway-probe", "/tmp/gateway-probe",
                                          "/var/tmp/gateway-probe", "probe.txt")}
    out["state_file_mode"] = oct(os.stat("probe.txt").st_mode & 0o777)
    out["tmp"] = sorted(os.listdir("/tmp"))
    out["list"] = {p: outcome(lambda p=p: os.listdir(p)) for p in ("/home", "/root", "/etc", "/usr/lib")}
    out["dev"] = sorted(os.listdir("/dev"))
    out["proc_pid1_visible"] = os.path.exists("/proc/1")
    out["proc_stat_readable"] = outcome(lambda: read("/proc/stat"))
    with open("/etc/gateway/gateway.yaml") as f:
        out["config_readable"] = bool(f.read())
    creds = os.environ.get("CREDENTIALS_DIRECTORY", "/nonexistent")
    out["credentials"] = {name: read(os.path.join(creds, name)) for name in sorted(os.listdir(creds))}
    out["credential_write"] = write(os.path.join(creds, "control_token"))
    # Network: the families the daemon uses, not the others; names resolve (glibc's AI_ADDRCONFIG
    # falls back when its netlink socket is refused); a port < 1024 needs the capability.
    families = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17, "AF_APPLETALK": 5,
                "AF_BLUETOOTH": 31, "AF_ALG": 38, "AF_VSOCK": 40}  # Linux numbers
    out["socket"] = {name: outcome(lambda f=number: open_socket(f, socket.SOCK_DGRAM)) for name, number in families.items()}
    out["getaddrinfo"] = outcome(lambda: socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG))
    probe = socket.socket()
    out["bind_1024_up"] = outcome(lambda: probe.bind(("127.0.0.1", 0)))
    out["bind_80"] = outcome(lambda: socket.socket().bind(("127.0.0.1", 80)))
    # Calls the filters refuse.
    out["refused"] = {
        "mount": outcome(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "unshare(CLONE_NEWUSER)": outcome(lambda: libc.unshare(0x10000000)),
        "personality(PER_LINUX32)": outcome(lambda: libc.personality(0x0008)),
        "mmap(PROT_WRITE|PROT_EXEC)": outcome(lambda: mmap.mmap(-1, 4096, prot=7)),
        "sethostname": outcome(lambda: libc.sethostname(b"x", 1)),
    }
    # What the daemon needs still works: threads (clone3 refused, glibc falls back to clone),
    # child processes, ctypes callbacks (libffi static trampolines, no W+X memory), TLS, and every
    # module of the package with its C libraries.
    box = []
    thread = threading.Thread(target=lambda: box.append(1))
    thread.start()
    thread.join()
    out["thread"] = "ok" if box else "failed"
    import subprocess

    out["subprocess"] = outcome(lambda: subprocess.run(["/bin/true"], check=True))
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
    out["ctypes_callback"] = callback(41)
    try:
        import cffi

        cffi.FFI().callback("int(int)", lambda x: x)
        out["cffi_callback"] = "ok"
    except MemoryError:
        out["cffi_callback"] = "MemoryError"
    import ssl

    out["ssl_context"] = outcome(ssl.create_default_context)
    import importlib
    import pkgutil

    import gateway

    failed = {}
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if module.name != "gateway.__main__":
            try:
                importlib.import_module(module.name)
            except Exception as err:  # noqa: BLE001 - report every module that does not load, not only the first
                failed[module.name] = f"{type(err).__name__}: {err}"
    out["import_failures"] = failed
    import av
    import numpy as np
    import opuslib
    import soxr

    pcm = (np.sin(np.arange(960) / 10) * 8000).astype(np.int16)
    encoder = opuslib.Encoder(48000, 1, opuslib.APPLICATION_VOIP)
    out["opus_packet"] = len(encoder.encode(pcm.tobytes(), 960)) > 0
    out["soxr"] = len(soxr.resample(pcm.astype(np.float32), 48000, 8000)) == 160
    out["av"] = av.__version__
    return out


def filters(spec: dict, scratch: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sandbox

    target = os.path.join(scratch, "suid")
    open(target, "w").close()
    timex = ctypes.create_string_buffer(256)  # struct timex, modes = 0: a read-only query
    hostname = socket.gethostname().encode()
    calls = {
        "RestrictAddressFamilies": lambda: open_socket(socket.AF_PACKET, socket.SOCK_RAW),
        "MemoryDenyWriteExecute": lambda: __import__("mmap").mmap(-1, 4096, prot=7),
        "RestrictRealtime": lambda: libc.sched_setscheduler(0, 1, ctypes.byref(ctypes.c_int(1))),
        "RestrictSUIDSGID": lambda: os.chmod(target, 0o4755),
        "RestrictNamespaces": lambda: libc.unshare(0x04000000),
        "ProtectKernelTunables": lambda: libc.syscall(156, None, None, None, None, None),  # _sysctl
        "ProtectKernelModules": lambda: libc.delete_module(b"gateway_probe_absent", os.O_NONBLOCK),
        "ProtectKernelLogs": lambda: libc.klogctl(10, None, 0),  # syslog(2) SYSLOG_ACTION_SIZE_BUFFER
        "ProtectClock": lambda: libc.adjtimex(timex),
        "PrivateDevices": lambda: libc.iopl(0),
        "ProtectHostname": lambda: libc.sethostname(hostname, len(hostname)),
        "SystemCallArchitectures": lambda: libc.syscall(0x40000000 | 39, None, None, None, None, None),  # x32 getpid
        "LockPersonality": lambda: libc.personality(0x0008),  # PER_LINUX32
        "SystemCallFilter": lambda: libc.swapoff(b"/gateway-probe-absent"),  # @swap, not @system-service
        "SystemCallFilter=~@resources": lambda: libc.setpriority(0, 0, 0),
        "clone3 under RestrictNamespaces": lambda: libc.syscall(435, None, None, None, None, None),
    }
    directive = {"SystemCallFilter=~@resources": "SystemCallFilter", "clone3 under RestrictNamespaces":
                 "RestrictNamespaces"}
    service = [tuple(p) for p in spec["service"]]
    results = {}
    for name, call in calls.items():
        key = directive.get(name, name)
        lines = [p for p in service if p[0] == key or (key == "SystemCallFilter" and p[0] == "SystemCallErrorNumber")]
        if not lines:
            continue
        results[name] = {}
        for label, with_filter in (("without", False), ("with", True)):
            read, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                if with_filter:
                    for f in sandbox.seccomp_filters(sandbox.Directives(lines), spec["groups"]):
                        f.load()
                os.write(write_end, outcome(call).encode())
                os._exit(0)
            os.close(write_end)
            text = os.read(read, 100).decode()
            os.close(read)
            _, wait = os.waitpid(pid, 0)
            results[name][label] = text if os.WIFEXITED(wait) else f"killed by signal {os.WTERMSIG(wait)}"
    return results


if __name__ == "__main__":
    if sys.argv[1] == "inside":
        print(json.dumps(inside()))
    else:
        with open(sys.argv[2]) as f:
            print(json.dumps(filters(json.load(f), sys.argv[3])))
