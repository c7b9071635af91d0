"""The code that runs inside the code sandbox: a solution server and a test judge.

rewards/code_sandbox.py runs this file's source as ``python -I -S -c`` with ``ROLE = "solution"`` or
``ROLE = "judge"`` prepended; importing it does nothing. It imports only the standard library.

- **solution** (one sandbox): loads the solution's code into a namespace, then answers requests from the judge
  (``call``, ``getattr``, ``setattr``, ``getitem``, ``setitem``, ``delitem``, ``len``, ``list``, ``contains``,
  ``bool``) on a pair of pipes, one JSON line per message. For stdin/stdout tests it runs the program once per
  input and sends the captured output to the parent, which compares it with the expected output itself.
- **judge** (another sandbox, another uid, another PID namespace): runs the test snippets. Every name of the
  solution is a :class:`Remote` handle in the judge; calling it sends the arguments as data and gets back data.

Only data crosses: :func:`encode` writes None, bool, int, float, complex, str, bytes, tuple, list, dict, set,
frozenset, Fraction and Decimal as JSON (scalars as themselves, the rest tagged), and :func:`decode` builds
exactly those builtin types. Any
other object stays in the solution's process and is sent as a handle (``["r", id]``). A handle compares by
identity only (its ``__eq__``, ``__hash__`` and ordering are never forwarded), so an object whose ``__eq__``
always says True cannot pass ``assert f(x) == 3``: the judge compares plain values it decoded itself. The
expected values (the test text, the expected stdout) never enter the solution's sandbox.
"""
import builtins
import io
import json
import os
import resource
import select
import signal
import sys
import time

MAX_LINE = 64 << 20  # longest message accepted on any pipe
MAX_NODES = 1_000_000  # most values one message may encode; a bigger value travels as a handle
MAX_DEPTH = 64
_BIG = 1 << 1000


class _Timeout(BaseException):
    pass


class _NotPlain(Exception):
    pass


class _Died(BaseException):
    """The solution's process died or broke the protocol while the judge waited on it."""


def _alarm(signum, frame):
    raise _Timeout()


# --------------------------------------------------------------------------------------------- codec
def _flat(v):
    """True if every item is an exact int (of a JSON-safe size) or str: the list travels as it is."""
    return all((type(x) is int and -_BIG < x < _BIG) or type(x) is str for x in v)


def encode(v, ref=None, budget=None, depth=0):
    """A value -> JSON: ints (below 2**1000), strs, finite floats, None and bools as themselves; anything else
    as ``[tag, payload]``. ``ref(obj) -> int`` turns a non-data object into a handle (None: refuse it)."""
    if budget is None:
        budget = [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise _NotPlain("value too large or too deep")
    t = type(v)
    if v is None or t is bool or t is str or (t is int and -_BIG < v < _BIG):
        return v
    if t is float and v - v == 0:  # finite
        return v
    if isinstance(v, Remote):
        return ["r", object.__getattribute__(v, "_rid")]
    if isinstance(v, int):  # big ints in hex: decimal conversion of huge ints is capped and slow
        return ["x", format(int(v), "x")]
    if isinstance(v, float):
        return ["f", float.__repr__(float(v))]
    if isinstance(v, complex):
        return ["c", [float.__repr__(v.real), float.__repr__(v.imag)]]
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return ["y" if isinstance(v, bytes) else "Y", bytes(v).hex()]
    sub = (lambda x: encode(x, ref, budget, depth + 1))
    if isinstance(v, (tuple, list)):
        items = tuple.__iter__(v) if isinstance(v, tuple) else list.__iter__(v)
        items = list(items)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise _NotPlain("value too large")
        if not _flat(items):
            items = [x if type(x) is str or (type(x) is int and -_BIG < x < _BIG) else sub(x) for x in items]
        return ["t" if isinstance(v, tuple) else "l", items]
    if isinstance(v, dict):
        return ["d", [[sub(k), sub(x)] for k, x in dict.items(v)]]
    if isinstance(v, frozenset):
        return ["F", [sub(x) for x in frozenset.__iter__(v)]]
    if isinstance(v, set):
        return ["S", [sub(x) for x in set.__iter__(v)]]
    fr, dc = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fr is not None and isinstance(v, fr.Fraction):
        return ["q", [format(int(v.numerator), "x"), format(int(v.denominator), "x")]]
    if dc is not None and isinstance(v, dc.Decimal):
        return ["D", dc.Decimal.__str__(v)]
    if ref is None:
        raise _NotPlain(f"a {type(v).__name__} cannot be passed between the test and the solution")
    return ["r", ref(v)]


def encode_or_ref(v, ref):
    """Data if ``v`` is data within the size limits, else a handle to it (the solution side)."""
    try:
        return encode(v, ref)
    except (_NotPlain, ValueError, RecursionError):
        return ["r", ref(v)]


def decode(x, deref, depth=0):
    """JSON from :func:`encode` -> builtin values only; ``deref(id)`` resolves a handle."""
    t = type(x)
    if x is None or t is bool or t is int or t is str or t is float:
        return x
    if depth > MAX_DEPTH + 1:
        raise ValueError("message nested too deeply")
    if t is not list or not x or type(x[0]) is not str:
        raise ValueError("malformed value")
    tag, arg = x[0], (x[1] if len(x) > 1 else None)
    sub = (lambda y: decode(y, deref, depth + 1))
    if tag == "x" and type(arg) is str:
        return int(arg, 16)
    if tag == "f" and type(arg) is str:
        return float(arg)
    if tag == "c" and type(arg) is list and len(arg) == 2:
        return complex(float(arg[0]), float(arg[1]))
    if tag in ("y", "Y") and type(arg) is str:
        return bytes.fromhex(arg) if tag == "y" else bytearray.fromhex(arg)
    if tag == "q" and type(arg) is list and len(arg) == 2:
        import fractions
        return fractions.Fraction(int(arg[0], 16), int(arg[1], 16))
    if tag == "D" and type(arg) is str:
        import decimal
        return decimal.Decimal(arg)
    if tag == "r" and type(arg) is int:
        return deref(arg)
    if type(arg) is not list:
        raise ValueError(f"malformed value with tag {tag!r}")
    if tag in ("t", "l"):
        items = [y if type(y) is int or type(y) is str else sub(y) for y in arg]
        return tuple(items) if tag == "t" else items
    if tag == "d":
        return {sub(k): sub(y) for k, y in arg}
    if tag == "S":
        return {sub(y) for y in arg}
    if tag == "F":
        return frozenset(sub(y) for y in arg)
    raise ValueError(f"unknown value tag {tag!r}")


class Lines:
    """Newline-delimited JSON over a pair of file descriptors, with deadlines on reads."""

    def __init__(self, rfd, wfd):
        self.rfd, self.wfd, self.buf = rfd, wfd, bytearray()

    def send(self, obj):
        data = (json.dumps(obj, allow_nan=False) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def recv(self, deadline=None):
        """The next message; None at EOF or past ``deadline`` (time.monotonic())."""
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                    return None
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                return None
            self.buf.extend(chunk)
            if len(self.buf) > MAX_LINE:
                raise ValueError("message too long")
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return json.loads(line)


# ------------------------------------------------------------------------------------- common set-up
def _setup(cfg):
    """Drop to the sandbox uid (privileged sandbox), set the limits, silence stdio; returns the result fd."""
    if cfg.get("uid") is not None and os.getuid() == 0:
        uid = int(cfg["uid"])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # all uids non-zero: the kernel clears every capability
        if os.getuid() == 0 or os.geteuid() == 0:
            os._exit(70)
    mem = int(cfg["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(cfg["fsize_bytes"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (int(cfg["cpu_seconds"]), int(cfg["cpu_seconds"]) + 1))
    if cfg.get("max_procs"):
        resource.setrlimit(resource.RLIMIT_NPROC, (int(cfg["max_procs"]),) * 2)
    res = os.dup(1)
    dn = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(dn, fd)
    sys.stdin = io.StringIO("")
    sys.stdout = sys.stderr = open(os.devnull, "w")
    signal.signal(signal.SIGALRM, _alarm)
    import _sitebuiltins  # what ``site`` would add (-S skips it): exit() and quit() in the solution
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    if cfg.get("patch_socket"):  # weak mode only: no namespace cuts the network, so at least refuse sockets
        import socket
        import _socket

        def _deny(*a, **k):
            raise OSError("network access is disabled in the flowrl code sandbox")
        socket.socket = _socket.socket = socket.SocketType = _deny
        socket.create_connection = socket.getaddrinfo = socket.socketpair = socket.create_server = _deny
    return res


def _timer(seconds):
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3) if seconds else 0)


# ------------------------------------------------------------------------------------------ solution
def solution_main(cfg):
    res = _setup(cfg)
    try:
        code = compile(cfg["code"], "<solution>", "exec")
    except BaseException:
        code = None
    if cfg["mode"] == "stdio":
        out_ch = Lines(None, res)
        out_ch.send({"ready": 1})
        for j, text in cfg["inputs"]:
            out = io.StringIO()
            try:
                sys.stdin, sys.stdout = io.StringIO(text), out
                _timer(cfg["time_limit"])
                try:
                    exec(code, {"__name__": "__main__", "__builtins__": builtins})
                except SystemExit as e:
                    if e.code not in (None, 0):
                        raise
                finally:
                    _timer(0)
                got = out.getvalue()
            except BaseException:
                got = None
            sys.stdout = sys.stderr = open(os.devnull, "w")
            out_ch.send({"j": j, "out": got if got is None or len(got) < MAX_LINE // 2 else None})
        os._exit(0)
    ch = Lines(int(cfg["rfd"]), int(cfg["wfd"]))
    objs, counter = {}, [0]

    def ref(o):
        counter[0] += 1
        objs[counter[0]] = o
        return counter[0]
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        _timer(cfg["time_limit"])
        try:
            exec(code, ns)
        finally:
            _timer(0)
        names = {k: encode_or_ref(v, ref) for k, v in list(ns.items()) if not k.startswith("__")}
        ch.send({"loaded": True, "names": names})
    except BaseException:
        ch.send({"loaded": False})
        os._exit(0)
    ops = {
        "call": lambda t, a: t(*a[0], **a[1]),
        "getattr": lambda t, a: getattr(t, a),
        "setattr": lambda t, a: setattr(t, a[0], a[1]),
        "getitem": lambda t, a: t[a],
        "setitem": lambda t, a: t.__setitem__(a[0], a[1]),
        "delitem": lambda t, a: t.__delitem__(a),
        "len": lambda t, a: len(t),
        "list": lambda t, a: list(t),
        "contains": lambda t, a: a in t,
        "bool": lambda t, a: bool(t),
    }
    while True:
        req = ch.recv()
        if req is None:
            os._exit(0)
        rid = req.get("id")
        try:
            _timer(req["budget"])
            try:
                target = objs[req["ref"]]
                arg = decode(req["arg"], objs.__getitem__)
                reply = {"id": rid, "ok": encode_or_ref(ops[req["op"]](target, arg), ref)}
            finally:
                _timer(0)
        except _Timeout:
            reply = {"id": rid, "timeout": True}
        except BaseException as e:
            try:
                reply = {"id": rid, "err": [str(type(e).__name__)[:100], str(e)[:300]]}
            except BaseException:
                reply = {"id": rid, "err": ["Exception", ""]}
        ch.send(reply)


# --------------------------------------------------------------------------------------------- judge
class RemoteError(Exception):
    """An exception raised in the solution whose type is not a builtin exception."""


class SolutionTimeout(BaseException):
    """The solution ran past the test's time limit (a BaseException, so ``except Exception`` cannot swallow it)."""


_EXC = {n: c for n, c in vars(builtins).items()
        if isinstance(c, type) and issubclass(c, Exception) and not n.startswith("_")}


class _Conn:
    def __init__(self, lines, wait):
        self.lines, self.wait = lines, wait
        self.deadline, self.next_id, self.pending = None, 0, None
        self.broken = self.timed_out = False

    def request(self, op, target, arg):
        if self.broken:
            raise _Died()
        enc = encode(arg)  # the test's arguments must be data (or handles)
        self.next_id += 1
        self.pending = self.next_id
        # the solution's own timer fires a little before the judge's, so its time-out reply normally arrives
        # before the judge gives up on it (a loaded machine can delay that reply by a large fraction of a second)
        budget = max(1e-3, self.deadline - time.monotonic() - 0.05) if self.deadline else None
        self.lines.send({"id": self.next_id, "op": op, "ref": object.__getattribute__(target, "_rid"),
                         "arg": enc, "budget": budget})
        reply = self.reply(None)
        if reply is None:
            self.broken = True
            raise _Died()
        return self.result(reply)

    def reply(self, deadline):
        """The reply to the pending request (stale ones are skipped); None if the solution died or went silent."""
        while True:
            try:
                msg = self.lines.recv(deadline)
            except (ValueError, RecursionError):
                msg = None
            if msg is None or not isinstance(msg, dict):
                return None
            if msg.get("id") == self.pending:
                self.pending = None
                return msg

    def result(self, msg):
        if msg.get("timeout"):
            self.timed_out = True
            raise SolutionTimeout("the solution ran past the time limit")
        if "err" in msg:
            name, text = (list(msg["err"]) + ["", ""])[:2]
            raise _EXC.get(name, RemoteError)(f"{name}: {text}" if name not in _EXC else text)
        try:
            return decode(msg["ok"], Remote)
        except (KeyError, ValueError, TypeError, RecursionError):
            self.broken = True
            raise _Died()


_conn = None


class Remote:
    """A handle to an object that lives in the solution's process. Attribute access, calls, item access,
    ``len``, iteration, ``in`` and truth are forwarded; equality, hashing and ordering are by identity."""

    __slots__ = ("_rid",)

    def __init__(self, rid):
        object.__setattr__(self, "_rid", rid)

    def __getattr__(self, name):
        return _conn.request("getattr", self, name)

    def __setattr__(self, name, value):
        _conn.request("setattr", self, (name, value))

    def __call__(self, *args, **kwargs):
        return _conn.request("call", self, (args, kwargs))

    def __getitem__(self, key):
        return _conn.request("getitem", self, key)

    def __setitem__(self, key, value):
        _conn.request("setitem", self, (key, value))

    def __delitem__(self, key):
        _conn.request("delitem", self, key)

    def __len__(self):
        return _conn.request("len", self, None)

    def __iter__(self):
        return iter(_conn.request("list", self, None))

    def __contains__(self, item):
        return _conn.request("contains", self, item)

    def __bool__(self):
        return _conn.request("bool", self, None)

    def __repr__(self):
        return f"<solution object {object.__getattribute__(self, '_rid')}>"


def judge_main(cfg):
    global _conn
    res = Lines(None, _setup(cfg))
    limit, wait = float(cfg["time_limit"]), float(cfg["wait"])
    _conn = conn = _Conn(Lines(int(cfg["rfd"]), int(cfg["wfd"])), wait)
    first = conn.reply(time.monotonic() + limit + wait)  # the load message (it has no id, like pending)
    if first is None or first.get("loaded") is not True or not isinstance(first.get("names"), dict):
        res.send({"loaded": False})
        os._exit(0)
    ns = {"__name__": "__test__", "__builtins__": builtins}
    try:
        for k, v in first["names"].items():
            ns[str(k)] = decode(v, Remote)
    except (ValueError, TypeError, RecursionError):
        res.send({"loaded": False})
        os._exit(0)
    res.send({"loaded": True})
    tests = cfg["tests"]
    for j in range(int(cfg["start"]), len(tests)):
        conn.timed_out = False
        status = "fail"
        try:
            code = compile(tests[j], f"<test {j}>", "exec")
            conn.deadline = time.monotonic() + limit
            _timer(limit)
            try:
                exec(code, ns)
            finally:
                _timer(0)
            status = "pass"
        except _Timeout:
            # the test's time ran out; if the solution was computing, it got the same deadline: wait briefly
            # for its own time-out reply, else it is stuck (it swallowed the interrupt) and must be killed
            if conn.pending is not None and conn.reply(time.monotonic() + wait) is None:
                conn.broken = True
        except BaseException:
            pass
        finally:
            conn.deadline = None
        if conn.broken:
            status = "killed"
        elif conn.timed_out:
            status = "fail"
        sys.stdout = sys.stderr = open(os.devnull, "w")
        res.send({"j": j, "status": status})
        if status == "killed":
            os._exit(0)
    os._exit(0)


def main():
    cfg = json.loads(sys.stdin.readline())
    role = globals().get("ROLE")
    if role == "solution":
        solution_main(cfg)
    elif role == "judge":
        judge_main(cfg)
    else:
        raise SystemExit(f"sandbox_runtime: unknown ROLE {role!r}")


if __name__ == "__main__" and "ROLE" in globals():
    main()
