"""Run a command confined the way a systemd unit's [Service] section confines it, with the kernel
mechanisms systemd itself uses, on a host where systemd cannot run the unit (no systemd as PID 1).

The chain keeps one pid from the first exec to the daemon (nothing forks), as systemd's main pid:

    unshare --mount --uts --ipc --propagation private --      namespaces (PrivateIPC, ProtectHostname)
      python sandbox.py mounts SPEC --                          the file system view, as root
        setpriv --reuid U --regid U --clear-groups ...          DynamicUser, CapabilityBoundingSet=,
                --bounding-set -all --no-new-privs --            NoNewPrivileges
          python sandbox.py seccomp SPEC --                     seccomp filters, as the service user
            COMMAND                                             (execve, filters inherited)

SPEC is JSON (see `launcher()`): the [Service] directives of the unit, plus where the test keeps
what the operator would install (/etc/gateway, credential sources, the state directory). Each
directive is reproduced as `MECHANISMS` says or listed in `NOT_EMULATED` with the reason; any other
directive, or a value this file does not implement, is an error (`Unsupported`), never ignored.

The seccomp filters follow systemd 252's src/shared/seccomp-util.c: one filter per directive, the
SystemCallFilter= allow-list last; the syscall groups come from `systemd-analyze syscall-filter`.
Stdlib only: the stages run with `python -I -S`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import resource
import shlex
import socket
import stat
import sys
import uuid

HERE = os.path.abspath(__file__)
DYNAMIC_UID = 61184 + 1021  # systemd allocates DynamicUser= ids from 61184-65519; no passwd entry
NOLOGIN = "/usr/sbin/nologin"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unsupported(Exception):
    """The unit asks for something this emulation does not implement (so a test would prove nothing)."""


# --- unit files ------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists, per systemd.syntax(7): `#`/`;` comments,
    trailing-backslash continuations. Repeated keys stay repeated; an empty value is kept (it resets
    list settings such as `CapabilityBoundingSet=`)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None and "=" in line:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"unit: cannot parse {raw!r}")
    return sections


class Directives:
    """The [Service] settings, queried the way systemd merges them."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = [tuple(p) for p in pairs]

    def names(self) -> set[str]:
        return {key for key, _ in self.pairs}

    def last(self, key: str, default: str | None = None) -> str | None:
        values = [value for k, value in self.pairs if k == key]
        return values[-1] if values else default

    def words(self, key: str) -> list[str]:
        """A list setting: words accumulate over lines, an empty assignment resets."""
        out: list[str] = []
        for k, value in self.pairs:
            if k == key:
                out = out + shlex.split(value) if value else []
        return out

    def all(self, key: str) -> list[str]:
        return [value for k, value in self.pairs if k == key]

    def flag(self, key: str) -> bool:
        value = self.last(key, "no")
        if value in ("yes", "true", "1", "on"):
            return True
        if value in ("no", "false", "0", "off"):
            return False
        raise Unsupported(f"{key}={value}")


def timespan_s(text: str) -> float:
    """systemd.time(7) spans such as `30s`, `1min 30s`, `500ms`; a bare number is seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit or "s"]
    return total


# --- libc -------------------------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.personality.argtypes = (ctypes.c_ulong,)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                   "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r}): {os.strerror(err)}")


def mountinfo() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) per line of /proc/self/mountinfo, in order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((path, set(fields[5].split(","))))
    return out


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def remount(path: str, *, readonly: bool, recursive: bool = False) -> None:
    """Per-mount read-only (or read-write) flag on the mount at `path` and, if `recursive`, every mount
    below it, keeping nosuid/nodev/noexec/atime flags (what systemd's bind_remount_recursive does)."""
    done = set()
    for point, options in reversed(mountinfo()):  # the last entry for a path is the visible one
        if point in done or not (point == path or (recursive and under(point, path))):
            continue
        done.add(point)
        flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0)
        for name, bit in PER_MOUNT_FLAGS.items():
            if name in options:
                flags |= bit
        mount(None, point, None, flags)


def bind(source: str, target: str, *, readonly: bool, recursive: bool = False) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    remount(target, readonly=readonly, recursive=recursive)


# --- stage 1: the file system view (root, inside the new mount namespace) ---------------------------


class View:
    """Builds the service's mount namespace the way systemd's namespace.c does, step by step."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.d = Directives(spec["service"])
        self.uid = spec["uid"]
        self.stage = spec["stage"]
        self.writable: list[str] = []  # mount points ProtectSystem= leaves read-write
        self.overlays = 0

    def staging(self, name: str) -> str:
        path = os.path.join(self.stage, name)
        os.makedirs(path, exist_ok=True)
        return path

    def make_mountpoint(self, path: str, *, directory: bool) -> None:
        """Create `path` to mount on without writing to the host: if it is missing, its deepest
        existing parent gets an overlay whose upper layer lives in the staging tmpfs (the overlay's
        own sub-mounts are bound back)."""
        if os.path.lexists(path):
            return
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent == "/":
            raise Unsupported(f"cannot create {path} without writing to the host's /")
        subs = sorted({p for p, _ in mountinfo() if under(p, parent) and p != parent})
        keep = {p: os.open(p, os.O_PATH) for p in subs}
        self.overlays += 1
        upper, work = self.staging(f"ovl{self.overlays}/upper"), self.staging(f"ovl{self.overlays}/work")
        mount("overlay", parent, "overlay", 0, f"lowerdir={parent},upperdir={upper},workdir={work}")
        for p, fd in keep.items():
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)
        if directory:
            os.makedirs(path, mode=0o755)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            open(path, "w").close()

    def inaccessible(self, path: str, *, mode: int = 0) -> None:
        """systemd's InaccessiblePaths=: an empty mode-000 directory or file over `path`."""
        if not os.path.lexists(path):
            return
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode={mode:04o},size=4k")
            if not mode:
                remount(path, readonly=True)
        else:
            bind(os.path.join(self.stage, "inaccessible"), path, readonly=True)

    # The steps, in the order they are applied.

    def operator_files(self) -> None:
        """What the operator installs (/etc/gateway) and what systemd creates for the unit
        (StateDirectory=, LoadCredential=, $NOTIFY_SOCKET), from where the test keeps them."""
        for target, source in self.spec["binds"].items():  # read-only, e.g. /etc/gateway
            self.make_mountpoint(target, directory=os.path.isdir(source))
            bind(source, target, readonly=True)
        for name in self.d.words("StateDirectory"):
            target, source = f"/var/lib/{name}", self.spec["state"][name]
            os.chown(source, self.uid, self.uid)
            os.chmod(source, 0o755)
            self.make_mountpoint(target, directory=True)
            bind(source, target, readonly=False)
            self.writable.append(target)
        credentials = self.d.all("LoadCredential")
        if credentials:
            target = f"/run/credentials/{self.spec['unit']}"
            self.make_mountpoint(target, directory=True)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700")
            for entry in credentials:
                name = entry.split(":", 1)[0]
                with open(self.spec["credentials"][name], "rb") as src:
                    data = src.read()
                path = os.path.join(target, name)
                with open(path, "wb") as out:
                    out.write(data)
                os.chown(path, self.uid, self.uid)
                os.chmod(path, 0o400)
            os.chown(target, self.uid, self.uid)
            os.chmod(target, 0o500)
            remount(target, readonly=True)
        if self.spec.get("notify_socket"):
            self.make_mountpoint("/run/systemd/notify", directory=False)
            bind(self.spec["notify_socket"], "/run/systemd/notify", readonly=False)

    def protect_home(self) -> None:
        value = self.d.last("ProtectHome", "no")
        if value == "no":
            return
        if value != "yes":
            raise Unsupported(f"ProtectHome={value}")
        for top in ("/home", "/root", "/run/user"):
            exposed = self.exposed_under(top)
            with self.keeping(exposed):
                self.inaccessible(top, mode=0o711 if exposed else 0)
            if exposed:
                remount(top, readonly=True)

    def exposed_under(self, top: str) -> list[str]:
        return [p for p in self.spec.get("expose", []) if under(p, top) and p != top]

    @contextlib.contextmanager
    def keeping(self, paths: list[str]):
        """The code under test must stay visible: in production it is in /opt/gateway and /usr; a
        checkout (or a Python) in a home directory or /tmp is bound back read-only at its path
        after the mount that hides it, and only its own path is traversable."""
        fds = {p: os.open(p, os.O_PATH) for p in paths}
        yield
        for p, fd in fds.items():
            os.makedirs(p, mode=0o711, exist_ok=True)
            bind(f"/proc/self/fd/{fd}", p, readonly=True, recursive=True)
            os.close(fd)

    def protect_proc(self) -> None:
        value = self.d.last("ProtectProc", "default")
        subset = self.d.last("ProcSubset", "all")
        if value == "default" and subset == "all":
            return
        if value not in ("default", "invisible", "noaccess", "ptraceable") or subset not in ("all", "pid"):
            raise Unsupported(f"ProtectProc={value} ProcSubset={subset}")
        options = [] if value == "default" else [f"hidepid={value}"]
        options += ["subset=pid"] if subset == "pid" else []
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(options))

    def protect_system(self) -> None:
        value = self.d.last("ProtectSystem", "no")
        if value == "no":
            return
        if value != "strict":
            raise Unsupported(f"ProtectSystem={value}")
        # strict: everything read-only but the API file systems (their own directives cover them)
        # and what the unit declares writable (StateDirectory=, ...). PrivateTmp= comes later.
        done = set()
        for point, _ in reversed(mountinfo()):
            if point in done or any(under(point, top) for top in ("/proc", "/sys", "/dev", *self.writable)):
                continue
            done.add(point)
            if os.path.lexists(point):
                remount(point, readonly=True)

    def protect_kernel(self) -> None:
        """ProtectKernelTunables=, ProtectControlGroups=, ProtectKernelModules=, ProtectKernelLogs=:
        the path tables of systemd's namespace.c."""
        if self.d.flag("ProtectKernelTunables"):
            for path in ("/proc/acpi", "/proc/apm", "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq",
                         "/proc/latency_stats", "/proc/mtrr", "/proc/scsi", "/proc/sys", "/proc/sysrq-trigger",
                         "/proc/timer_stats"):
                if os.path.lexists(path):
                    bind(path, path, readonly=True, recursive=True)
            for path in ("/proc/kallsyms", "/proc/kcore"):
                self.inaccessible(path)
            remount("/sys", readonly=True, recursive=True)
            self.inaccessible("/sys/fs/bpf")
        if self.d.flag("ProtectControlGroups") and os.path.isdir("/sys/fs/cgroup"):
            remount("/sys/fs/cgroup", readonly=True, recursive=True)
        if self.d.flag("ProtectKernelModules"):
            for path in ("/lib/modules", "/usr/lib/modules"):
                if os.path.isdir(path) and not os.path.islink(path):
                    self.inaccessible(path)
        if self.d.flag("ProtectKernelLogs"):
            self.inaccessible("/proc/kmsg")
            self.inaccessible("/dev/kmsg")

    def private_devices(self) -> None:
        """A fresh /dev with the API devices only, as systemd's mount_private_dev()."""
        if not self.d.flag("PrivateDevices"):
            return
        dev = self.staging("dev")
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME | MS_NOEXEC, "mode=0755")
        for name in ("null", "zero", "full", "random", "urandom", "tty"):
            st = os.stat(f"/dev/{name}")
            os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, st.st_rdev)
            os.chmod(f"{dev}/{name}", 0o666)
        os.mkdir(f"{dev}/pts", 0o755)
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        for name in ("shm", "mqueue", "hugepages"):
            if os.path.isdir(f"/dev/{name}"):
                os.mkdir(f"{dev}/{name}", 0o755)
                mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND | MS_REC)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2"), ("log", "/run/systemd/journal/dev-log")):
            os.symlink(target, f"{dev}/{name}")
        mount(dev, "/dev", None, MS_MOVE)

    def private_tmp(self) -> None:
        if self.d.flag("PrivateTmp"):
            for path in ("/tmp", "/var/tmp"):
                with self.keeping(self.exposed_under(path)):
                    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

    def build(self) -> None:
        # Our own scratch space: overlay layers, the inaccessible file, the new /dev. Hidden by
        # PrivateTmp= at the end (it is under the test's /tmp).
        mount("tmpfs", self.stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
        self.writable.append(self.stage)
        open(os.path.join(self.stage, "inaccessible"), "w").close()
        os.chmod(os.path.join(self.stage, "inaccessible"), 0)
        self.operator_files()
        self.protect_home()
        self.protect_proc()
        self.protect_system()
        self.protect_kernel()
        self.private_devices()  # after the read-only pass: /dev is private and writable, as systemd's
        self.private_tmp()  # last: the staging tmpfs and the test's files live under /tmp


def service_environment(spec: dict, d: Directives) -> dict[str, str]:
    """The environment systemd 252 gives a system service with DynamicUser= (systemd.exec(5),
    "Environment variables in spawned processes")."""
    user = d.last("User") or spec["unit"].rsplit(".", 1)[0]
    env = {"PATH": DEFAULT_PATH, "USER": user, "LOGNAME": user, "HOME": "/", "SHELL": NOLOGIN,
           "INVOCATION_ID": uuid.uuid4().hex, "SYSTEMD_EXEC_PID": str(os.getpid())}
    for line in d.all("Environment"):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value
    for path in d.all("EnvironmentFile"):
        optional, path = path.startswith("-"), path.lstrip("-")
        if optional and not os.path.exists(path):
            continue
        with open(path) as f:  # KEY=VALUE lines; # and ; comments; quotes around the value dropped
            for line in f:
                key, eq, value = line.strip().partition("=")
                if eq and key and key[0] not in "#;":
                    env[key.strip()] = value.strip().strip("'\"")
    if d.words("StateDirectory"):
        env["STATE_DIRECTORY"] = ":".join(f"/var/lib/{n}" for n in d.words("StateDirectory"))
    if d.all("LoadCredential"):
        env["CREDENTIALS_DIRECTORY"] = f"/run/credentials/{spec['unit']}"
    if spec.get("notify_socket") and d.last("Type") in ("notify", "notify-reload"):
        env["NOTIFY_SOCKET"] = "/run/systemd/notify"
        watchdog = timespan_s(d.last("WatchdogSec", "0"))
        if watchdog:
            env["WATCHDOG_USEC"] = str(int(watchdog * 1e6))
            env["WATCHDOG_PID"] = str(os.getpid())
    return env


def setpriv_argv(spec: dict, d: Directives) -> list[str]:
    argv = ["setpriv"]
    if d.flag("DynamicUser"):
        argv += [f"--reuid={spec['uid']}", f"--regid={spec['uid']}", "--clear-groups"]
    bounding = d.words("CapabilityBoundingSet")
    if "CapabilityBoundingSet" in d.names():
        keep = ",".join("+" + c.lower().removeprefix("cap_") for c in bounding)
        argv.append("--bounding-set=-all" + ("," + keep if keep else ""))
    argv.append("--inh-caps=-all")
    ambient = d.words("AmbientCapabilities")
    if ambient:
        caps = ",".join("+" + c.lower().removeprefix("cap_") for c in ambient)
        argv[-1] = "--inh-caps=-all," + caps
        argv.append("--ambient-caps=" + caps)
    if d.flag("NoNewPrivileges"):
        argv.append("--no-new-privs")
    return argv


def stage_mounts(spec: dict, command: list[str]) -> None:
    d = Directives(spec["service"])
    unknown = d.names() - set(MECHANISMS) - set(NOT_EMULATED)
    if unknown:
        raise Unsupported(f"no emulation for {sorted(unknown)}")
    View(spec).build()
    for key, value in (("LimitNOFILE", resource.RLIMIT_NOFILE),):
        if d.last(key):
            soft, _, hard = d.last(key).partition(":")
            limit = (int(soft), int(hard or soft))
            try:
                resource.setrlimit(value, limit)
            except ValueError:  # raising the hard limit needs CAP_SYS_RESOURCE, which systemd has
                cap = resource.getrlimit(value)[1]
                resource.setrlimit(value, (min(limit[0], cap), min(limit[1], cap)))
                print(f"sandbox: {key}={d.last(key)} capped at {cap} (no CAP_SYS_RESOURCE)", file=sys.stderr)
    payload = {"env": service_environment(spec, d), "service": spec["service"], "uid": spec["uid"],
               "groups": spec["groups"]}
    os.execvp("setpriv", setpriv_argv(spec, d) + [
        "--", sys.executable, "-I", "-S", HERE, "seccomp", json.dumps(payload), "--", *command])


# --- stage 2: seccomp (the service user, no_new_privs set) ------------------------------------------


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 2, 4, 6, 7
SCMP_FLTATR_ACT_BADARCH, SCMP_FLTATR_CTL_NNP = 2, 3
CLONE_NEW = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
             "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
PROT_WRITE, PROT_EXEC, SHM_EXEC, O_CREAT = 0x2, 0x4, 0o100000, 0o100
SCHED_OTHER, SCHED_BATCH, SCHED_IDLE = 0, 3, 5


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class Filter:
    """One seccomp filter built with libseccomp (ctypes), for the native architecture."""

    lib = None

    def __init__(self, default_action: int, *, bad_arch_allow: bool = True) -> None:
        if Filter.lib is None:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_init.argtypes = (ctypes.c_uint32,)
            lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
            lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
            lib.seccomp_rule_add_exact_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                         ctypes.c_uint, ctypes.POINTER(ArgCmp))
            lib.seccomp_load.argtypes = (ctypes.c_void_p,)
            lib.seccomp_release.argtypes = (ctypes.c_void_p,)
            Filter.lib = lib
        self.ctx = self.lib.seccomp_init(default_action)
        # As systemd's seccomp_init_for_arch(): no_new_privs must already be set (by setpriv, from
        # NoNewPrivileges=), libseccomp must not set it for us.
        self.check(self.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_CTL_NNP, 0), "CTL_NNP")
        if bad_arch_allow:
            self.check(self.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ALLOW), "BADARCH")

    @staticmethod
    def check(r: int, what: str) -> None:
        if r < 0:
            raise OSError(-r, f"seccomp {what}: {os.strerror(-r)}")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:  # __NR_SCMP_ERROR: not a syscall on this architecture (systemd skips it too)
            return False
        array = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
        r = self.lib.seccomp_rule_add_exact_array(self.ctx, action, nr, len(cmps), array)
        if r == -errno.EDOM:  # a pseudo-syscall (e.g. clock_adjtime64 on x86-64): ignored, as systemd does
            return False
        self.check(r, name)
        return True

    def load(self) -> None:
        self.check(self.lib.seccomp_load(self.ctx), "load")
        self.lib.seccomp_release(self.ctx)


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups[name], groups) if name.startswith("@") else {name}
    return out


def deny_set(names: list[str], groups: dict[str, list[str]], code: int = errno.EPERM) -> Filter:
    f = Filter(SCMP_ACT_ALLOW)
    for name in sorted(expand(names, groups)):
        f.rule(errno_action(code), name)
    return f


def seccomp_filters(d: Directives, groups: dict[str, list[str]]) -> list[Filter]:
    """The filters of systemd 252's exec_child(), in its order; the allow-list last."""
    filters: list[Filter] = []
    EPERM = errno_action(errno.EPERM)

    families = d.words("RestrictAddressFamilies")
    if families:
        if families[0].startswith("~"):
            raise Unsupported("RestrictAddressFamilies=~ (deny list)")
        allowed = sorted(getattr(socket, name) for name in families)
        f = Filter(SCMP_ACT_ALLOW)
        nope = errno_action(errno.EAFNOSUPPORT)
        f.rule(nope, "socket", (0, SCMP_CMP_LT, allowed[0], 0))
        f.rule(nope, "socket", (0, SCMP_CMP_GT, allowed[-1], 0))
        for af in range(1, allowed[-1]):
            if af not in allowed:
                f.rule(nope, "socket", (0, SCMP_CMP_EQ, af, 0))
        filters.append(f)

    if d.flag("MemoryDenyWriteExecute"):
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(EPERM, "mmap", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE))
        f.rule(EPERM, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(EPERM, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(EPERM, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(f)

    if d.flag("RestrictRealtime"):
        f = Filter(SCMP_ACT_ALLOW)
        permitted = (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)
        for policy in range(max(permitted)):
            if policy not in permitted:
                f.rule(EPERM, "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
        f.rule(EPERM, "sched_setscheduler", (1, SCMP_CMP_GT, max(permitted), 0))
        filters.append(f)

    if d.flag("RestrictSUIDSGID"):
        f = Filter(SCMP_ACT_ALLOW)
        for bit in (stat.S_ISUID, stat.S_ISGID):
            for name, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("mkdir", 1), ("mkdirat", 2),
                              ("mknod", 1), ("mknodat", 2), ("creat", 1)):
                f.rule(EPERM, name, (arg, SCMP_CMP_MASKED_EQ, bit, bit))
            f.rule(EPERM, "open", (1, SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT), (2, SCMP_CMP_MASKED_EQ, bit, bit))
            f.rule(EPERM, "openat", (2, SCMP_CMP_MASKED_EQ, O_CREAT, O_CREAT), (3, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(EPERM, "openat2")  # flags behind a pointer: blocked altogether
        filters.append(f)

    namespaces = d.last("RestrictNamespaces", "no")
    if namespaces != "no":
        if namespaces != "yes":
            raise Unsupported(f"RestrictNamespaces={namespaces}")
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(errno_action(errno.ENOSYS), "clone3")  # flags behind a pointer: glibc falls back to clone()
        f.rule(EPERM, "setns")
        for flag in CLONE_NEW.values():
            f.rule(EPERM, "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            f.rule(EPERM, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        filters.append(f)

    if d.flag("ProtectKernelTunables"):
        filters.append(deny_set(["_sysctl"], groups))
    if d.flag("ProtectKernelModules"):
        filters.append(deny_set(["@module"], groups))
    if d.flag("ProtectKernelLogs"):
        filters.append(deny_set(["syslog"], groups))
    if d.flag("ProtectClock"):
        filters.append(deny_set(["@clock"], groups))
    if d.flag("PrivateDevices"):
        filters.append(deny_set(["@raw-io"], groups))
    if d.flag("ProtectHostname"):
        filters.append(deny_set(["sethostname", "setdomainname"], groups))

    archs = d.words("SystemCallArchitectures")
    if archs:
        if archs != ["native"]:
            raise Unsupported(f"SystemCallArchitectures={' '.join(archs)}")
        # seccomp_restrict_archs(): no rules, only the native ABI; x86 (int 0x80) and x32 calls take
        # libseccomp's bad-architecture action (kill).
        filters.append(Filter(SCMP_ACT_ALLOW, bad_arch_allow=False))

    if d.flag("LockPersonality"):
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(EPERM, "personality", (0, SCMP_CMP_NE, libc.personality(0xFFFFFFFF) & 0xFF, 0))  # PER_LINUX
        filters.append(f)

    lines = d.all("SystemCallFilter")
    if lines:
        allow: set[str] = set()
        for i, line in enumerate(lines):
            if not line:
                allow = set()
            elif line.startswith("~"):
                if i == 0:
                    raise Unsupported("SystemCallFilter= deny list first")
                allow -= expand(shlex.split(line[1:]), groups)
            else:
                allow |= expand(["@default", *shlex.split(line)], groups)
        code = d.last("SystemCallErrorNumber")
        default = errno_action(getattr(errno, code)) if code else SCMP_ACT_KILL_PROCESS
        f = Filter(default)
        for name in sorted(allow):
            f.rule(SCMP_ACT_ALLOW, name)
        filters.append(f)
    return filters


def stage_seccomp(spec: dict, command: list[str]) -> None:
    d = Directives(spec["service"])
    if d.flag("DynamicUser") and os.getuid() != spec["uid"]:
        raise SystemExit(f"sandbox: running as uid {os.getuid()}, expected {spec['uid']}")
    env = spec["env"]
    os.chdir(d.last("WorkingDirectory", "/").replace("%S", "/var/lib"))
    os.umask(int(d.last("UMask", "0022"), 8))
    for f in seccomp_filters(d, spec["groups"]):
        f.load()
    os.execve(command[0], command, env)


# --- test side --------------------------------------------------------------------------------------


def syscall_groups(systemd_analyze: str = "systemd-analyze") -> dict[str, list[str]]:
    """Every `@group` of `systemd-analyze syscall-filter` with its members (syscalls and @groups)."""
    import subprocess

    text = subprocess.run([systemd_analyze, "syscall-filter"], check=True, capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return groups


def launcher(spec: dict, command: list[str]) -> list[str]:
    """argv that runs `command` confined by `spec` (as root: the first stage mounts). `spec`:
    service: the [Service] (key, value) pairs; unit: its name; uid: the dynamic uid; stage: an
    empty scratch directory; binds: {path in the sandbox: test file or directory} (read-only);
    state: {StateDirectory name: test directory}; credentials: {LoadCredential id: test file};
    notify_socket: the test's socket or None; expose: code paths to keep under ProtectHome=;
    groups: `syscall_groups()`."""
    d = Directives(spec["service"])
    flags = ["--mount", "--propagation", "private"]
    flags += ["--uts"] if d.flag("ProtectHostname") else []
    flags += ["--ipc"] if d.flag("PrivateIPC") else []
    return ["unshare", *flags, "--", sys.executable, "-I", "-S", HERE, "mounts", json.dumps(spec), "--", *command]


# Every [Service] directive of the unit: how it is reproduced here, or why it cannot be.
MECHANISMS = {
    "Type": "NOTIFY_SOCKET set; the test binds the AF_UNIX datagram socket and waits for READY=1",
    "NotifyAccess": "the test checks the sender's pid (SO_PASSCRED) is the main pid",
    "WatchdogSec": "WATCHDOG_USEC and WATCHDOG_PID set; the test waits for WATCHDOG=1",
    "ExecStartPre": "run under the same sandbox before ExecStart (`gateway check`)",
    "ExecStart": "the command the test runs, binary path mapped to this checkout's venv",
    "ExecReload": "run under the same sandbox and user, $MAINPID substituted",
    "DynamicUser": "setpriv --reuid/--regid to an unallocated uid in 61184-65519, --clear-groups",
    "StateDirectory": "a test directory, owned by that uid, bound read-write at /var/lib/NAME",
    "WorkingDirectory": "chdir before exec",
    "UMask": "umask before exec",
    "LoadCredential": "files copied into a tmpfs at /run/credentials/UNIT (0400, read-only mount)",
    "EnvironmentFile": "read as KEY=VALUE lines (an absent optional file is skipped)",
    "LimitNOFILE": "setrlimit before dropping privileges",
    "NoNewPrivileges": "setpriv --no-new-privs (and the filters are loaded without libseccomp setting it)",
    "CapabilityBoundingSet": "setpriv --bounding-set -all (plus the listed capabilities)",
    "AmbientCapabilities": "setpriv --inh-caps/--ambient-caps",
    "ProtectSystem": "every mount remounted read-only but /proc, /sys, /dev and the state directory",
    "ProtectHome": "empty mode-000 tmpfs over /home, /root, /run/user",
    "PrivateTmp": "fresh tmpfs on /tmp and /var/tmp",
    "PrivateDevices": "fresh /dev tmpfs: null zero full random urandom tty pts ptmx shm; seccomp @raw-io",
    "PrivateIPC": "unshare --ipc",
    "ProtectHostname": "unshare --uts; seccomp sethostname/setdomainname",
    "ProtectKernelTunables": "read-only /proc/sys and siblings and /sys; /proc/kcore inaccessible; seccomp _sysctl",
    "ProtectKernelModules": "/usr/lib/modules inaccessible; seccomp @module",
    "ProtectKernelLogs": "/proc/kmsg, /dev/kmsg inaccessible; seccomp syslog",
    "ProtectControlGroups": "/sys/fs/cgroup read-only",
    "ProtectClock": "seccomp @clock",
    "ProtectProc": "new procfs instance with hidepid=",
    "ProcSubset": "new procfs instance with subset=",
    "RestrictAddressFamilies": "seccomp: socket() of other families fails EAFNOSUPPORT",
    "RestrictNamespaces": "seccomp: unshare/clone with CLONE_NEW*, setns fail EPERM; clone3 ENOSYS",
    "LockPersonality": "seccomp: personality() other than the current one fails EPERM",
    "RestrictRealtime": "seccomp: sched_setscheduler to FIFO/RR/DEADLINE fails EPERM",
    "RestrictSUIDSGID": "seccomp: chmod/open/mkdir/mknod with S_ISUID/S_ISGID fail EPERM",
    "MemoryDenyWriteExecute": "seccomp: mmap W+X, mprotect/pkey_mprotect +X, shmat SHM_EXEC fail EPERM",
    "SystemCallArchitectures": "seccomp: only the native ABI (x86 and x32 calls killed)",
    "SystemCallFilter": "seccomp allow-list, groups expanded from `systemd-analyze syscall-filter`",
    "SystemCallErrorNumber": "the allow-list's default action",
}
NOT_EMULATED = {
    "Restart": "systemd's own behaviour after an exit; checked statically",
    "RestartSec": "systemd's own behaviour after an exit",
    "TimeoutStartSec": "systemd's timer; the test's READY=1 deadline is well within it",
    "TimeoutStopSec": "systemd's timer; the test asserts exit within it after SIGTERM",
    "KillMode": "systemd's own signalling; the test signals the main pid",
    "SyslogIdentifier": "journald metadata: there is no journal here",
    "RemoveIPC": "cleanup after the service stops (implied by DynamicUser=)",
}


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    assert sys.argv[3] == "--"
    try:
        {"mounts": stage_mounts, "seccomp": stage_seccomp}[mode](payload, sys.argv[4:])
    except (Unsupported, OSError) as err:
        print(f"sandbox ({mode}): {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(125) from None
