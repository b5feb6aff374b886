"""The trusted half of a sandboxed run, executed inside the sandbox as ``python -I -S -c <this file>``.

Standard library only, never imported by the trainer (:mod:`.sandbox_launch` reads this file's
text). It reads one JSON job from stdin, sets the resource limits, runs the candidate's code, then
evaluates each *probe* (a candidate expression such as ``add(2, 3)``, never an assertion) and
writes its value as plain data, one JSON line per event, on the stdout it was started with:

    {"loaded": true}  |  {"load_error": "NameError: ..."}
    {"probe": 0, "value": <encoded>}  |  {"probe": 0, "error": "ZeroDivisionError: ..."}
    {"done": true}

Encoded values: ``null``/booleans/numbers/strings/lists as JSON; ``{"tuple": [...]}``,
``{"set": [...]}``, ``{"frozenset": [...]}``, ``{"dict": [[key, value], ...]}``,
``{"bytes": "<hex>"}``, ``{"complex": [re, im]}``, and ``{"iter": [...]}`` for an iterator or
generator (materialised). Subclasses of these types are sent as their base type, read through the
base type's own methods, so an overridden ``__eq__`` or ``__iter__`` is not consulted.

Nothing here is a security measure: the candidate runs in this process and can rewrite any of it
(print forged lines, patch ``json``, exit early). The parent treats every line as the candidate's
own claim, decodes it strictly and judges it against expected values this process never sees.
"""

import json
import os
import resource
import sys

_SCALARS = (bool, int, float, str, type(None))


class _UnencodableError(Exception):
    pass


def _encode(value, depth, budget, max_depth):
    """``value`` as JSON-able data (see the module docstring); ``budget`` = [items left]."""
    if depth > max_depth:
        raise _UnencodableError(f"the value is nested deeper than {max_depth} levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise _UnencodableError("the value has too many items")
    if value is None or type(value) in _SCALARS:
        return value
    # subclasses go through the base type's methods (int.__index__, str.__str__, ...): exact copies
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        c = complex.__complex__(value)
        return {"complex": [c.real, c.imag]}

    def items(iterator):
        return [_encode(x, depth + 1, budget, max_depth) for x in iterator]

    if isinstance(value, list):
        return items(list.__iter__(value))
    if isinstance(value, tuple):
        return {"tuple": items(tuple.__iter__(value))}
    if isinstance(value, frozenset):
        return {"frozenset": items(frozenset.__iter__(value))}
    if isinstance(value, set):
        return {"set": items(set.__iter__(value))}
    if isinstance(value, dict):
        return {
            "dict": [
                [_encode(k, depth + 1, budget, max_depth), _encode(v, depth + 1, budget, max_depth)]
                for k, v in dict.items(value)
            ]
        }
    if hasattr(type(value), "__next__") or type(value).__name__ in ("range", "dict_keys", "dict_values", "dict_items"):
        out = []
        for x in iter(value):
            if len(out) >= budget[0]:
                raise _UnencodableError("the iterator yields too many items")
            out.append(x)
        return {"iter": items(out)}
    raise _UnencodableError(f"returned a {type(value).__name__}, which is not plain data")


def _describe(err):
    try:
        text = str(err)[:300]
    except BaseException:  # the candidate's exception may refuse even that
        text = "?"
    return text if isinstance(err, _UnencodableError) else f"{type(err).__name__}: {text}"


def main():
    job = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    limits = job["limits"]
    # before any candidate code: CPU seconds, address space, processes (threads count too), file
    # size, open files, no core dumps
    for name, soft in (
        ("RLIMIT_CPU", limits["cpu_s"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        hard = soft + 1 if name == "RLIMIT_CPU" else soft  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(getattr(resource, name), (soft, hard))
    # results go to the original stdout; the candidate's prints go nowhere
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    dumps, max_depth, max_items, max_bytes = json.dumps, job["max_depth"], job["max_items"], job["max_value_bytes"]

    def emit(record):
        out.write(dumps(record) + "\n")
        out.flush()

    namespace = {"__name__": "__solution__"}
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
    except BaseException as err:  # SystemExit and KeyboardInterrupt are the candidate's too
        emit({"load_error": _describe(err)})
        emit({"done": True})
        os._exit(0)
    emit({"loaded": True})
    for i, source in enumerate(job["probes"]):
        try:
            value = eval(compile(source, f"<probe {i}>", "eval"), namespace)
            line = dumps({"probe": i, "value": _encode(value, 0, [max_items], max_depth)})
            if len(line) > max_bytes:
                raise _UnencodableError(f"the value takes more than {max_bytes} bytes")
            out.write(line + "\n")
            out.flush()
        except BaseException as err:
            emit({"probe": i, "error": _describe(err)})
    emit({"done": True})
    os._exit(0)  # no atexit handlers, no waiting for the candidate's threads


if __name__ == "__main__":
    main()
