"""Checks that run where the student's code never ran: the grader's other half.

The grader executes a submission in a Jupyter kernel. The course's checks must not run in that kernel:
anything the notebook did to it (to the import system, to the standard library, to IPython, to the
package) it could also do to the checks. So the checks run here, in a fresh process started from the
installed course with ``python -I`` (no working folder or ``PYTHONPATH`` on its path) before the
notebook runs, with every check module already imported. Each student function is a
:class:`RemoteFunction`: calling it sends the arguments to the kernel, which calls the student's
function and sends the result back.

Both directions carry **data only** (see :func:`encode`): numbers, strings, bytes, booleans, ``None``,
lists, tuples, dicts (any keys, in order), sets, numpy arrays and scalars, and tensors, all as plain
values. The checker decodes them into new objects of those exact types, so a result whose comparisons
always succeed, or a type defined in the notebook, cannot reach a check; it gets a verdict naming its
type. Three kinds of course object travel as arguments, rebuilt in the kernel from their state: a
:class:`~course_utils.tokenizer.Tokenizer`, a :class:`~course_utils.model.GPT` (with its parameters,
gradients coming back) and an AdamW optimiser over one. A scalar tensor result comes back with the
gradients the kernel computed for the arguments that required them, so a check can still differentiate
it. Arguments that the student's function changed are copied back into the checker's objects, so a
check that an input was left alone still works.

The grader starts ``python -I -m course_utils.sandbox --lab NN``, which prints ``ready``, then reads one
JSON line (the kernel's connection file and process id, and the instructor's private cases) and prints
one JSON line of verdicts: ``{exercise: [status, points, max_points, message]}``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jupyter_client import BlockingKernelClient  # imported before the submission runs, like every check

from . import checks, checks_lab03
from .checks import FAILED, PASSED, TODO, CheckFailed, NotYetImplemented, RemoteProblem
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

#: The most a reply may hold; a function that returns more is answered with a verdict, not a stalled grader.
MAX_REPLY_BYTES = 256 * 2**20

_TENSOR_DTYPES = {
    str(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class Unsendable(TypeError):
    """A value that is not plain data: ``type_name`` says what it was."""

    def __init__(self, type_name: str):
        super().__init__(f"a {type_name} is not plain data")
        self.type_name = type_name


# -- the wire format --------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(value: Any, *, objects: bool = False, memo: dict | None = None, leaves: list | None = None) -> Any:
    """``value`` as JSON-ready data. Lists stay JSON arrays; everything else that JSON would blur is tagged
    (``{"$tuple": …}``, ``{"$dict": [[key, value], …]}``, ``{"$tensor": …}``), so decoding gives back the
    same types. With ``objects``, course objects are encoded as their state (arguments on their way to the
    kernel); tensors that require grad are appended to ``leaves``."""
    memo = {} if memo is None else memo

    def enc(v: Any) -> Any:
        if v is None or type(v) is bool or type(v) is str:
            return v
        if isinstance(v, bool):
            return bool(v)
        if isinstance(v, int) and not isinstance(v, np.integer):
            return int.__int__(v)
        if isinstance(v, float) and not isinstance(v, np.floating):
            return float.__float__(v)
        if isinstance(v, str):
            return str.__str__(v)
        if isinstance(v, bytes | bytearray):
            return {"$bytes": _b64(bytes(v))}
        if isinstance(v, tuple):
            return {"$tuple": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in list.__iter__(v)]
        if isinstance(v, dict):
            return {"$dict": [[enc(k), enc(x)] for k, x in dict.items(v)]}
        if isinstance(v, set | frozenset):
            return {"$set" if isinstance(v, set) else "$frozenset": [enc(x) for x in v]}
        if isinstance(v, np.generic) and v.dtype.kind in "biuf":
            return {"$npscalar": v.dtype.str, "data": _b64(v.tobytes())}
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            a = np.ascontiguousarray(v)
            return {"$ndarray": a.dtype.str, "shape": list(a.shape), "data": _b64(a.tobytes())}
        if isinstance(v, torch.Tensor) and str(v.dtype) in _TENSOR_DTYPES:
            t = v.detach().cpu().contiguous()
            if objects and v.requires_grad and leaves is not None:
                leaves.append(v)
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {"$tensor": str(t.dtype), "shape": list(t.shape), "data": _b64(raw), "grad": bool(v.requires_grad)}
        if objects:
            return _encode_object(v, enc, memo)
        raise Unsendable(type(v).__name__)

    return enc(value)


def _encode_object(v: Any, enc, memo: dict) -> dict:
    if isinstance(v, Tokenizer):
        return {"$object": "Tokenizer", "state": enc(v.to_dict())}
    if isinstance(v, GPT):
        memo[id(v)] = len(memo)
        _MODELS[id(v)] = v
        return {
            "$object": "GPT",
            "ref": memo[id(v)],
            "config": enc(dataclasses.asdict(v.config)),
            "state": enc(dict(v.state_dict())),
            "training": v.training,
        }
    if isinstance(v, torch.optim.AdamW):
        params = [id(p) for group in v.param_groups for p in group["params"]]
        for model_id, ref in memo.items():
            if [id(p) for p in _MODELS[model_id].parameters()] == params:
                settings = {k: v.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
                return {"$object": "AdamW", "model": ref, "settings": enc(settings)}
        raise Unsendable("AdamW over parameters that are not one model's")
    if isinstance(v, checks_lab03._Recorder):
        return {"$object": "Recorder", "model": enc(v.inner)}
    raise Unsendable(type(v).__name__)


#: Models met while encoding the current call's arguments, by id (so an optimiser can name its model).
_MODELS: dict[int, GPT] = {}


def decode(raw: Any, *, objects: bool = False, leaves: list | None = None, refs: dict | None = None) -> Any:
    """The value :func:`encode` encoded. Without ``objects`` (the checker's side), only data comes out:
    an object's tag is an error."""
    refs = {} if refs is None else refs

    def dec(r: Any) -> Any:
        if r is None or isinstance(r, bool | int | float | str):
            return r
        if isinstance(r, list):
            return [dec(x) for x in r]
        if not isinstance(r, dict) or len(r) < 1:
            raise ValueError(f"not in the wire format: {type(r).__name__}")
        if "$tuple" in r:
            return tuple(dec(x) for x in r["$tuple"])
        if "$dict" in r:
            return {dec(k): dec(x) for k, x in r["$dict"]}
        if "$set" in r:
            return {dec(x) for x in r["$set"]}
        if "$frozenset" in r:
            return frozenset(dec(x) for x in r["$frozenset"])
        if "$bytes" in r:
            return base64.b64decode(r["$bytes"])
        if "$npscalar" in r:
            return np.frombuffer(base64.b64decode(r["data"]), dtype=np.dtype(r["$npscalar"]))[0]
        if "$ndarray" in r:
            data = base64.b64decode(r["data"])
            return np.frombuffer(data, dtype=np.dtype(r["$ndarray"])).reshape(r["shape"]).copy()
        if "$tensor" in r:
            dtype = _TENSOR_DTYPES[r["$tensor"]]
            data = bytearray(base64.b64decode(r["data"]))
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            t = flat.view(dtype).reshape(r["shape"]).clone()
            if objects and r.get("grad") and t.is_floating_point():
                t.requires_grad_(True)
                if leaves is not None:
                    leaves.append(t)
            return t
        if "$object" in r and objects:
            return _decode_object(r, dec, refs)
        raise ValueError(f"not plain data: {sorted(r)[0]}")

    return dec(raw)


def _decode_object(r: dict, dec, refs: dict) -> Any:
    kind = r["$object"]
    if kind == "Tokenizer":
        return Tokenizer.from_dict(dec(r["state"]))
    if kind == "GPT":
        model = GPT(GPTConfig(**dec(r["config"])))
        model.load_state_dict(dec(r["state"]))
        model.train(r["training"])
        refs[r["ref"]] = model
        return model
    if kind == "AdamW":
        return torch.optim.AdamW(refs[r["model"]].parameters(), **dec(r["settings"]))
    if kind == "Recorder":
        return checks_lab03._Recorder(dec(r["model"]))
    raise ValueError(f"unknown object {kind!r}")


def _after_state(value: Any) -> Any:
    """What the checker needs back of an object argument after the call."""
    if isinstance(value, GPT):
        return {
            "params": {n: p.detach() for n, p in value.named_parameters()},
            "grads": {n: p.grad for n, p in value.named_parameters()},
        }
    if isinstance(value, checks_lab03._Recorder):
        return {"calls": [list(c) for c in value.calls]}
    return None


def _apply_after(original: Any, after: Any) -> None:
    """Copy an argument's state after the call (decoded, data only) into the checker's own object."""
    if isinstance(original, GPT):
        with torch.no_grad():
            for name, p in original.named_parameters():
                p.copy_(after["params"][name])
                grad = after["grads"].get(name)
                p.grad = grad if isinstance(grad, torch.Tensor) and grad.shape == p.shape else None
    elif isinstance(original, checks_lab03._Recorder):
        original.calls[:] = [tuple(c) for c in after["calls"]]
    elif isinstance(original, list) and isinstance(after, list):
        original[:] = after
    elif isinstance(original, dict) and isinstance(after, dict):
        original.clear()
        original.update(after)
    elif isinstance(original, set) and isinstance(after, set):
        original.clear()
        original.update(after)
    elif isinstance(original, torch.Tensor) and isinstance(after, torch.Tensor):
        if after.shape == original.shape and after.dtype == original.dtype:
            with torch.no_grad():
                original.copy_(after)
    elif isinstance(original, np.ndarray) and isinstance(after, np.ndarray):
        if after.shape == original.shape and original.flags.writeable:
            original[...] = after


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- the kernel's side ------------------------------------------------------------------------------------


def serve(name: str, request_path: str, reply_path: str, namespace: dict) -> None:
    """Run in the student's kernel: call ``namespace[name]`` on the request's arguments, write the reply.
    Nothing here is trusted by the checker; it only decides what data comes back."""
    try:
        reply = _serve(name, Path(request_path), namespace)
        text = dumps(reply)
    except Unsendable as e:
        text = dumps({"unsendable": e.type_name})
    except BaseException as e:  # noqa: BLE001 — the reply must always be written
        text = dumps({"broken": f"{type(e).__name__}: {e}"[:500]})
    Path(reply_path).write_text(text, encoding="utf-8")


def _serve(name: str, request_path: Path, namespace: dict) -> dict:
    request = json.loads(request_path.read_text(encoding="utf-8"))
    if request.get("probe"):
        fn = namespace.get(name)
        return {"exists": fn is not None, "callable": callable(fn), "type": type(fn).__name__}
    leaves: list = []
    args = decode(request["args"], objects=True, leaves=leaves)
    before = [_plain_or_none(a) for a in args]
    fn = namespace.get(name)
    try:
        with torch.set_grad_enabled(bool(request.get("grad_enabled", True))):
            result = fn(*args)
    except NotImplementedError as e:
        return {"todo": str(e)}
    except BaseException as e:  # noqa: BLE001 — the student's bug, or an interrupt after the time limit
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "course_utils" not in f.filename]
        where = [frames[-1].lineno, frames[-1].line] if frames and frames[-1].line else None
        return {"error": type(e).__name__, "message": str(e)[:1000], "where": where}
    reply: dict[str, Any] = {"result": encode(result)}
    if leaves and isinstance(result, torch.Tensor) and result.requires_grad and result.dim() == 0:
        try:
            grads = torch.autograd.grad(result, leaves, allow_unused=True)
            reply["grads"] = [encode(g) for g in grads]
        except RuntimeError:
            pass
    changed = {}
    for i, (arg, old) in enumerate(zip(args, before, strict=True)):
        state = _after_state(arg)
        if state is not None:
            changed[str(i)] = encode(state)
        elif old is not None:
            try:
                new = encode(arg)
            except Unsendable:
                continue
            if new != old:
                changed[str(i)] = new
    reply["changed"] = changed
    return reply


def _plain_or_none(arg: Any) -> Any:
    try:
        return encode(arg)
    except Unsendable:
        return None


# -- the checker's side -----------------------------------------------------------------------------------


class KernelGone(Exception):
    """The notebook's kernel cannot be reached any more."""


class _AttachGradients(torch.autograd.Function):
    """``value`` (a scalar computed elsewhere) as a function of ``leaves`` with known gradients."""

    @staticmethod
    def forward(ctx, value, grads, *leaves):  # noqa: ARG004 — the leaves are inputs only to be differentiated
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *[None if g is None else grad_output * g for g in ctx.grads])


class Kernel:
    """The student's kernel, reached through its connection file; calls run as ``serve`` there."""

    def __init__(self, connection_file: str, pid: int | None, folder: Path):
        self.pid, self.folder, self.calls = pid, folder, 0
        self.client = BlockingKernelClient()
        self.client.load_connection_file(connection_file)
        self.client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        self.gone: str | None = None

    def close(self) -> None:
        self.client.stop_channels()

    def alive(self) -> bool:
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def run(self, name: str, request: dict, deadline: float) -> dict:
        if self.gone:
            raise KernelGone(self.gone)
        if not self.alive():
            self.gone = "the notebook's kernel is not running any more (it died or was shut down)"
            raise KernelGone(self.gone)
        self.calls += 1
        request_path = self.folder / f"request-{self.calls}.json"
        reply_path = self.folder / f"reply-{self.calls}.json"
        request_path.write_text(dumps(request), encoding="utf-8")
        code = (
            f"__import__('course_utils.sandbox', fromlist=['serve']).serve("
            f"{name!r}, {str(request_path)!r}, {str(reply_path)!r}, globals())"
        )
        msg_id = self.client.execute(code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
        if not self._wait(msg_id, deadline):
            self.interrupt()
            if not self._wait(msg_id, time.monotonic() + 10):
                self.gone = "the notebook's kernel stopped answering after a time limit"
            raise TimeoutError
        if not reply_path.exists():
            raise RemoteProblem(
                "the grader's call did not run in your notebook's kernel (was IPython's input or execution changed?)"
            )
        if reply_path.stat().st_size > MAX_REPLY_BYTES:
            raise RemoteProblem(f"your function returned more than {MAX_REPLY_BYTES // 2**20} MB")
        try:
            reply = json.loads(reply_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RemoteProblem(f"the reply from your notebook's kernel was damaged ({e})") from None
        finally:
            request_path.unlink(missing_ok=True)
            reply_path.unlink(missing_ok=True)
        if not isinstance(reply, dict):
            raise RemoteProblem("the grader's call to your notebook's kernel got a reply that is not an answer")
        return reply

    def _wait(self, msg_id: str, deadline: float) -> bool:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.client.get_shell_msg(timeout=min(left, 1.0))
            except queue.Empty:
                if not self.alive():
                    self.gone = "the notebook's kernel died while your function ran"
                    raise KernelGone(self.gone) from None
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return True

    def interrupt(self) -> None:
        if self.pid is not None and self.alive():
            os.kill(self.pid, signal.SIGINT)


class RemoteFunction:
    """Stands in, in the checker, for the student's function of that name in the kernel."""

    def __init__(self, kernel: Kernel, name: str, deadline: float):
        self.kernel, self.__name__, self.deadline = kernel, name, deadline

    def __call__(self, *args: Any) -> Any:
        _MODELS.clear()
        leaves: list = []
        try:
            encoded = encode(list(args), objects=True, leaves=leaves)
        except Unsendable as e:  # a check of ours passed something the wire cannot carry
            raise RuntimeError(f"the grader cannot send a {e.type_name} to the notebook") from None
        request = {"args": encoded, "grad_enabled": torch.is_grad_enabled()}
        reply = self.kernel.run(self.__name__, request, self.deadline)
        if "todo" in reply:
            raise NotImplementedError(reply["todo"])
        if "error" in reply:
            where = reply.get("where")
            where = f" (line {where[0]}: {where[1]})" if isinstance(where, list) and len(where) == 2 else ""
            if reply["error"] == "KeyboardInterrupt":
                raise TimeoutError
            raise RemoteProblem(f"your function raised {reply['error']}: {reply['message']}{where}")
        if "unsendable" in reply:
            raise RemoteProblem(
                f"your function returned a {reply['unsendable']}, which cannot be checked: return plain data "
                "(numbers, strings, lists, tuples, dicts, sets, arrays or tensors)"
            )
        if "result" not in reply:
            raise RemoteProblem(
                "the grader's call to your function got a reply that is not an answer"
                + (f" ({reply['broken']})" if isinstance(reply.get("broken"), str) else "")
            )
        try:
            result = decode(reply["result"])
            for index, raw in reply.get("changed", {}).items():
                _apply_after(args[int(index)], decode(raw))
            grads = [decode(g) for g in reply.get("grads", [])]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise RemoteProblem(f"the reply from your notebook's kernel was not plain data ({e})") from None
        if grads and len(grads) == len(leaves) and isinstance(result, torch.Tensor) and result.dim() == 0:
            usable = [
                g if isinstance(g, torch.Tensor) and g.shape == leaf.shape else None
                for g, leaf in zip(grads, leaves, strict=True)
            ]
            result = _AttachGradients.apply(result, usable, *leaves)
        return result


def run_checks(
    lab: str,
    kernel: Kernel,
    extra_source: str,
    check_timeout: float,
    *,
    names: list[str] | None = None,
    aliases: dict[str, str] | None = None,
) -> dict:
    """Every exercise of ``lab`` (or those in ``names``) checked against the kernel's functions of the same
    names (or their ``aliases``): ``{name: [status, points, max_points, message]}``."""
    extra: dict = {}
    if extra_source:
        exec(compile(extra_source, "extra-tests", "exec"), extra)
    results = {}
    for ex in checks.exercises(lab):
        if names is not None and ex.name not in names:
            continue
        target = (aliases or {}).get(ex.name, ex.name)

        def verdict(status: str, message: str, ex=ex) -> list:
            return [status, ex.points if status == PASSED else 0.0, ex.points, message]

        deadline = time.monotonic() + check_timeout
        try:
            probe = kernel.run(target, {"probe": True}, deadline)
            if not isinstance(probe, dict) or not isinstance(probe.get("exists"), bool):
                raise RemoteProblem("the grader's question to your notebook's kernel got a reply that is not an answer")
            if not probe.get("exists"):
                results[ex.name] = verdict(
                    FAILED, f"no function named {ex.name} after running the notebook (keep the name the exercise gives)"
                )
                continue
            if not probe.get("callable"):
                results[ex.name] = verdict(FAILED, f"expected a function called {ex.name}, got {probe.get('type')}")
                continue
            fn = RemoteFunction(kernel, target, deadline)
            v = checks.evaluate(ex.name, fn)
            status, message = v.status, v.message
            private = extra.get("extra_" + ex.name)
            if private is not None and status == PASSED:
                try:
                    private(fn)
                except CheckFailed as e:
                    status, message = FAILED, f"failed a private test case: {e}"
                except NotYetImplemented:
                    status, message = TODO, "not implemented yet"
            results[ex.name] = verdict(status, message)
        except TimeoutError:
            results[ex.name] = verdict(FAILED, f"timed out after {check_timeout:g} s while checking (an endless loop?)")
        except KernelGone as e:
            results[ex.name] = verdict(FAILED, f"could not be checked: {e}")
        except RemoteProblem as e:
            results[ex.name] = verdict(FAILED, str(e))
        except Exception as e:  # noqa: BLE001 — whatever came back, the other exercises are still checked
            results[ex.name] = verdict(FAILED, f"the check could not complete ({type(e).__name__}: {e})"[:500])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The grader's checker process (started by course_utils.grade).")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--check-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    checks.exercises(args.lab)  # every check module imported now, before the notebook runs
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 1
    go = json.loads(line)
    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
        kernel = Kernel(go["connection_file"], go.get("pid"), Path(tmp))
        try:
            results = run_checks(args.lab, kernel, go.get("extra", ""), args.check_timeout)
        finally:
            kernel.close()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
