"""A warm ClientApp launcher: one long-lived process per site imports torch & co. once and forks a child per task.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (``flower-superexec``'s subprocess
executor), and that process imports Flower, torch, MONAI, Opacus... again: 5-10 s per exchange on a quiet
machine, more than the compute of a query or an evaluation. `lungmae site start` therefore starts this module
(:func:`serve`) beside the SuperNode. It imports the heavy third-party modules once (:data:`PRELOAD`; never the
site's own ``client``/``lungmae_core`` modules, which the app bundle provides and Flower loads, and no gRPC
channel or torch thread pool is created before forking), then listens on a Unix socket in the site's state
directory.

The ``flwr-clientapp`` on the SuperNode's ``PATH`` (``client/fab_check.py`` writes it) stays tiny, standard
library only (:func:`launcher_main`): it connects to the socket, passes its argv, environment, working
directory and its stdin/stdout/stderr file descriptors (``socket.send_fds``), and exits with the child's exit
status. The forked child runs exactly what the launcher ran before: ``client.fab_check.clientapp_main(argv)``,
bundle check first, so the trust rules are unchanged.

Safety rules:

* The socket's directory must be owned by this user with mode 0700 and the socket with mode 0600; both sides
  also check the peer's uid (``SO_PEERCRED``) and refuse any other user.
* A launcher that dies (SIGKILL included: its end of the socket closes) gets its child killed; SIGTERM,
  SIGINT and SIGHUP sent to the launcher are forwarded to the child.
* Until the warm process has acknowledged a task with the child's pid, the launcher can still fall back to
  running ``clientapp_main`` in its own process (logged), so a site never stops working because the warm
  process is absent, stuck or refuses; after the acknowledgement it never falls back (the child may already
  hold the task).

Example (what `lungmae site start` runs, and what the launcher calls):
    >>> serve(state_dir / "warm-clientapp" / "clientapp.sock")        # blocks; SIGTERM stops it
    >>> launch(state_dir / "warm-clientapp" / "clientapp.sock", ["--token", "..."])   # child's exit status
    0
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PRELOAD", "SOCKET_NAME", "WARM_DIR_NAME", "WarmSocketError", "launch", "launcher_main", "preload",
           "serve", "socket_problem", "warm_socket_path"]

logger = logging.getLogger(__name__)

#: Folder (in the site's state directory) and socket name.
WARM_DIR_NAME = "warm-clientapp"
SOCKET_NAME = "clientapp.sock"
#: Third-party modules worth importing once; missing optional ones are skipped (logged).
PRELOAD = ("numpy", "scipy", "yaml", "cryptography", "torch", "torch.nn", "torch.nn.functional", "pydicom",
           "monai", "monai.networks", "opacus", "flwr.app", "flwr.clientapp", "flwr.supernode.cli.flwr_clientapp",
           "flwr.supernode.runtime.run_clientapp")
#: How long the launcher waits for the warm process to acknowledge a task before running it itself.
ACK_TIMEOUT_S = 10.0
_MAX_REQUEST_BYTES = 4 << 20
_SUN_PATH_MAX = 107  # Linux sockaddr_un.sun_path, less the terminating NUL
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What a forked child runs: the checking ``flwr-clientapp`` (``module:function``, called with the argv).
DEFAULT_TARGET = "client.fab_check:clientapp_main"


class WarmSocketError(OSError):
    """The warm process's socket cannot be used (wrong owner or mode, too long a path, another one running)."""


def warm_socket_path(state_dir: Path) -> Path:
    """The socket of the site whose state directory is ``state_dir``."""
    return Path(state_dir).resolve() / WARM_DIR_NAME / SOCKET_NAME


def socket_problem(path: Path, *, expect_socket: bool = True) -> str | None:
    """Why ``path`` must not be used as this user's warm-process socket (None: fine).

    The folder must be owned by this user and closed to others (0700); the socket (when ``expect_socket``)
    must be a socket owned by this user and closed to others (0600).
    """
    if len(os.fsencode(str(path))) > _SUN_PATH_MAX:
        return f"the socket path {path} is longer than {_SUN_PATH_MAX} bytes (a Unix socket limit)"
    uid = os.getuid()
    checks = [(path.parent, stat.S_ISDIR, "folder")] + ([(path, stat.S_ISSOCK, "socket")] if expect_socket else [])
    for where, is_kind, kind in checks:
        try:
            info = os.lstat(where)
        except OSError as exc:
            return f"{kind} {where}: {exc.strerror or exc}"
        if not is_kind(info.st_mode):
            return f"{where} is not a {kind}"
        if info.st_uid != uid:
            return f"{kind} {where} is owned by uid {info.st_uid}, not by this user ({uid})"
        if info.st_mode & 0o077:
            return f"{kind} {where} has mode {stat.S_IMODE(info.st_mode):o}; it must be closed to others (0700/0600)"
    return None


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


# --- the launcher side (standard library only: it runs once per message) -----------------------------------


def _read_line(sock: socket.socket, buffer: bytearray) -> dict[str, Any] | None:
    """The next JSON line from ``sock`` (None at end of stream); ``buffer`` keeps what follows it."""
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object from the warm process, got {line[:80]!r}")
    return value


def launch(path: Path, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
           fds: Sequence[int] = (0, 1, 2), ack_timeout_s: float = ACK_TIMEOUT_S) -> int | None:
    """Run ``flwr-clientapp argv`` in a child of the warm process listening on ``path``; wait for it.

    Returns:
        The child's exit status (128 + N when it died of signal N), or None when the warm process could not
        take the task (absent, refused, not answering within ``ack_timeout_s``): the caller then runs it.
    """
    problem = socket_problem(path)
    if problem is not None:
        logger.warning("lungmae: warm ClientApp process not used (%s); running the ClientApp in this process", problem)
        return None
    request = json.dumps({"argv": list(argv), "env": dict(os.environ if env is None else env),
                          "cwd": os.getcwd() if cwd is None else cwd}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    buffer = bytearray()
    try:
        sock.settimeout(ack_timeout_s)
        sock.connect(str(path))
        if _peer_uid(sock) != os.getuid():
            raise WarmSocketError(f"the process listening on {path} runs as another user")
        header = struct.pack("!I", len(request))
        socket.send_fds(sock, [header], list(fds))
        sock.sendall(request)
        ack = _read_line(sock, buffer)
        if ack is None or not isinstance(ack.get("pid"), int):
            raise WarmSocketError(f"the warm process refused the task: {ack.get('error') if ack else 'no answer'}")
    except (OSError, ValueError) as exc:
        sock.close()
        logger.warning("lungmae: warm ClientApp process at %s not usable (%s); running the ClientApp in this "
                       "process", path, exc)
        return None
    pid: int = ack["pid"]
    previous = {sig: signal.signal(sig, lambda signum, _frame: _forward(pid, signum)) for sig in _FORWARDED}
    try:
        sock.settimeout(None)
        while True:
            try:
                outcome = _read_line(sock, buffer)
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries recv; kept for clarity)
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if outcome is None:
        logger.error("lungmae: the warm ClientApp process stopped while running task pid %d", pid)
        return 1
    if "signal" in outcome:
        return 128 + int(outcome["signal"])
    return int(outcome.get("exit", 1))


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def launcher_main(path: str | Path, argv: Sequence[str] | None = None) -> int:
    """The ``flwr-clientapp`` on the SuperNode's PATH: the warm process runs the task, or we do (fallback)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    status = launch(Path(path), args)
    if status is not None:
        return status
    from client.fab_check import clientapp_main

    return _run_clientapp(clientapp_main, args)


def _run_clientapp(main: Any, argv: Sequence[str]) -> int:
    """``main(argv)`` as a process would end: its exit status, a traceback and 1 for an uncaught exception."""
    try:
        main(list(argv))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # the child must never return into the warm process's loop
        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return 0


# --- the warm process ---------------------------------------------------------------------------------------


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules`` (the heavy third-party ones); returns those that are not installed."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            logger.info("lungmae: warm ClientApp process: %s not preloaded (%s)", name, exc)
            missing.append(name)
    return missing


def _bind(path: Path) -> socket.socket:
    """Listen on ``path``: folder 0700 and socket 0600, both ours; a live socket there is an error."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    problem = socket_problem(path, expect_socket=False)
    if problem is not None:
        raise WarmSocketError(f"Unable to serve the warm ClientApp process: {problem}")
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its process is gone
        else:
            raise WarmSocketError(f"Unable to serve the warm ClientApp process: another one listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One task request: (argv/env/cwd, the launcher's file descriptors)."""
    conn.settimeout(5.0)
    data, fds, _flags, _addr = socket.recv_fds(conn, 4, 8)
    try:
        while len(data) < 4:
            chunk = conn.recv(4 - len(data))
            if not chunk:
                raise ValueError("the launcher closed the connection before its request")
            data += chunk
        (size,) = struct.unpack("!I", data)
        if size > _MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes refused (at most {_MAX_REQUEST_BYTES})")
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("the launcher closed the connection in the middle of its request")
            body += chunk
        request = json.loads(body)
        if (not isinstance(request, dict) or not isinstance(request.get("argv"), list)
                or not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str)):
            raise ValueError("a request needs argv (list), env (object) and cwd (string)")
        if len(fds) != 3:
            raise ValueError(f"a request passes stdin, stdout and stderr; got {len(fds)} file descriptors")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def _child(request: dict[str, Any], fds: list[int], close: Sequence[socket.socket], target: str) -> None:
    """In the forked child: become the launcher's ``flwr-clientapp`` process, run it, and exit (never returns)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sock in close:
            sock.close()
        for std_fd, fd in enumerate(fds):
            os.dup2(fd, std_fd)
            os.close(fd)
        logging.getLogger().handlers.clear()  # the warm process's own log setup is not the task's
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        os.chdir(request["cwd"])
        # The site's own modules (client.fab_check...) are imported only now, in the child, as the launcher did.
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        module, _, function = target.partition(":")
        code = _run_clientapp(getattr(importlib.import_module(module), function), [str(a) for a in request["argv"]])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class _Server:
    """The warm process's event loop: accept tasks, fork, report exit statuses, kill orphans."""

    def __init__(self, listener: socket.socket, target: str) -> None:
        self.listener, self.target = listener, target
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        self.children: dict[int, socket.socket] = {}
        self.stopping = False

    def run(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        try:
            while not self.stopping:
                for key, _events in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wakeups()
                    else:
                        self._launcher_event(key.fileobj, key.data)  # type: ignore[arg-type]
                self._reap()
        finally:
            signal.set_wakeup_fd(-1)
            for pid, conn in list(self.children.items()):
                _forward(pid, signal.SIGKILL)
                conn.close()
            self.selector.close()

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def _drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(4096, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            uid = _peer_uid(conn)
            if uid != os.getuid():
                logger.warning("lungmae: warm ClientApp process: refused a connection from uid %d", uid)
                conn.close()
                return
            request, fds = _receive_request(conn)
        except (OSError, ValueError) as exc:
            logger.warning("lungmae: warm ClientApp process: bad request (%s)", exc)
            _send(conn, {"error": str(exc)})
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.selector.close()  # its epoll descriptor is the warm process's, not the task's
            others = [self.listener, self.wake_r, self.wake_w, conn, *self.children.values()]
            _child(request, fds, others, self.target)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        if not _send(conn, {"pid": pid}):
            _forward(pid, signal.SIGKILL)  # the launcher is already gone
        self.selector.register(conn, selectors.EVENT_READ, pid)
        logger.info("lungmae: warm ClientApp process: task started as pid %d", pid)

    def _launcher_event(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if data:
            return  # the launcher sends nothing after its request; ignore it
        self.selector.unregister(conn)
        if pid in self.children:
            logger.warning("lungmae: warm ClientApp process: the launcher of pid %d is gone; killing the task", pid)
            _forward(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            outcome = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                       else {"exit": os.waitstatus_to_exitcode(status)})
            _send(conn, outcome)
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()


def _send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


def serve(path: Path, *, modules: Sequence[str] = PRELOAD, target: str = DEFAULT_TARGET) -> None:
    """Preload ``modules``, then serve tasks on ``path`` until SIGTERM/SIGINT/SIGHUP (children are killed then).

    Each task runs ``target`` (``module:function``, imported in the child only) with the launcher's argv.

    Raises:
        WarmSocketError: the folder is not ours or open to others, or another warm process listens there.
    """
    started = time.monotonic()
    missing = preload(modules)
    listener = _bind(path)
    logger.warning("lungmae: warm ClientApp process ready on %s (%d modules preloaded in %.1f s%s)", path,
                   len(modules) - len(missing), time.monotonic() - started,
                   f"; not installed: {', '.join(missing)}" if missing else "")
    try:
        _Server(listener, target).run()
    finally:
        listener.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m client.warm_clientapp --socket PATH``: the site's warm ClientApp process."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m client.warm_clientapp", description=main.__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on (folder: 0700)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        serve(args.socket)
    except WarmSocketError as exc:
        print(f"lungmae: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
