"""Grade a folder of submitted notebooks into a gradebook CSV, with feedback for each student.

    python -m course_utils.grade SUBMISSIONS --out gradebook.csv [--extra-tests private.py]

Each submission runs headless in a fresh kernel, in its own temporary folder, in the smoke profile,
with a time limit per cell and per notebook, a memory limit, and network connections refused. Cells
that fail do not stop it. The checks do not run in that kernel: they run in a separate process
(:mod:`course_utils.sandbox`), started from the installed course before the submission's first cell,
which calls the student's functions in the kernel with plain data and gets plain data back. So nothing
the notebook does to its own Python (redefining ``check``, patching the package, the import system, the
standard library or IPython, printing a forged report, returning an object that equals everything)
reaches the checks. A broken submission (syntax error, endless loop, missing or renamed function,
invalid JSON, a kernel that dies) costs that student the affected marks, with the reason in their
feedback, and never stops the run.

What it does not guarantee: the submission runs as the grader's user, so it can read and write what
that user can. Grade untrusted notebooks in a container or a throw-away account (the README shows one
command).

Student names come from the file names: ``alice_01_tokenisation.ipynb`` and
``alice/01_tokenisation.ipynb`` both grade as ``alice``.

Private cases (``--extra-tests FILE``): a Python file defining ``extra_<exercise>(fn)`` functions that
use :func:`course_utils.checks.call` and ``expect*`` like the public checks and return how many cases
they ran. They run in the checker process too. An exercise earns its marks only if its public check
and its private cases all pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .checks import FAILED, PASSED, TODO, exercises

DEFAULT_CELL_TIMEOUT = 120
DEFAULT_NOTEBOOK_TIMEOUT = 900
DEFAULT_CHECK_TIMEOUT = 30
DEFAULT_MEMORY_LIMIT_GB = 8.0

# Loaded into each kernel (via sitecustomize) before the notebook runs: any socket connection to a
# host other than this machine fails, so a submission cannot use, or wait on, the network.
NO_NETWORK = """
import socket as _socket
_connect = _socket.socket.connect
def _local_only(self, address, *args):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise OSError("network access is disabled while grading")
    return _connect(self, address, *args)
_socket.socket.connect = _local_only
"""


# Also in each kernel's sitecustomize: a ceiling on the kernel's address space, hard as well as soft, so one
# submission cannot take the grading machine's memory (it gets a MemoryError instead).
MEMORY_LIMIT = """
import os as _os, resource as _resource
_limit = int(_os.environ.get("COURSE_MEMORY_LIMIT") or 0)
if _limit:
    _resource.setrlimit(_resource.RLIMIT_AS, (_limit, _limit))
"""


class Checker:
    """The checks' own process (``python -I -m course_utils.sandbox``): started before the submission runs,
    in a folder of its own, it imports every check, then calls the student's functions in the kernel."""

    def __init__(self, lab: str, folder: Path, root: Path, check_timeout: float):
        env = {
            **_kernel_env(),
            "COURSE_DATA_DIR": str(root / "data"),
            "COURSE_RUNS_DIR": str(folder / "runs"),
            "MPLBACKEND": "Agg",
        }
        self.check_timeout = check_timeout
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-m", "course_utils.sandbox", "--lab", lab, "--check-timeout", str(check_timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=folder,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        self.errors: deque = deque(maxlen=20)
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, self.errors.append), daemon=True).start()

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def _line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def _failure(self, what: str) -> RuntimeError:
        tail = " / ".join(line for line in self.errors if line)[-500:]
        return RuntimeError(f"{what}{': ' + tail if tail else ''}")

    def wait_ready(self, timeout: float = 300) -> None:
        if self._line(timeout) != "ready":
            raise self._failure("the checker process did not start")

    def run(self, km, extra_tests: str, n_exercises: int) -> dict:
        process = getattr(getattr(km, "provisioner", None), "process", None)
        go = {"connection_file": km.connection_file, "pid": getattr(process, "pid", None), "extra": extra_tests}
        self.process.stdin.write(json.dumps(go) + "\n")
        self.process.stdin.close()
        line = self._line(self.check_timeout * (n_exercises + 1) + 60)
        if not line:
            raise self._failure("the checks did not finish")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class Result:
    student: str
    path: Path
    lab: str | None
    scores: dict[str, float] = field(default_factory=dict)
    max_scores: dict[str, float] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.scores.values())


def lab_notebooks(root: Path) -> dict[str, str]:
    """Lab number -> notebook stem, e.g. ``{"01": "01_tokenisation"}``."""
    return {p.stem[:2]: p.stem for p in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def detect_lab(nb: dict | None, path: Path, labs: dict[str, str]) -> str | None:
    if nb:
        for cell in nb.get("cells", [])[:3]:
            source = "".join(cell.get("source", ""))
            match = re.match(r"#\s*Lab\s+(\d\d)\b", source)
            if match and match.group(1) in labs:
                return match.group(1)
    for number, stem in labs.items():
        if stem in path.name or re.match(rf"^{number}[_\W]", path.name):
            return number
    return None


def student_name(path: Path, submissions: Path, labs: dict[str, str]) -> str:
    stem = path.stem
    for lab_stem in sorted(labs.values(), key=len, reverse=True):
        stem = stem.replace(lab_stem, "")
    stem = re.sub(r"^[\s_.\-]+|[\s_.\-]+$", "", stem)
    if stem:
        return stem
    parent = path.parent
    return parent.name if parent != submissions else path.stem


def grade_one(
    path: Path,
    student: str,
    labs: dict[str, str],
    root: Path,
    *,
    extra_tests: str = "",
    cell_timeout: int = DEFAULT_CELL_TIMEOUT,
    notebook_timeout: int = DEFAULT_NOTEBOOK_TIMEOUT,
    check_timeout: int = DEFAULT_CHECK_TIMEOUT,
    memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
) -> Result:
    import nbformat  # optional: the instructors' extra (pip install course_utils[grade])
    from nbclient import NotebookClient  # optional: as above
    from nbclient.exceptions import DeadKernelError  # optional: as above

    start = time.monotonic()
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
            raise ValueError("it has no list of cells")
        nb = nbformat.reads(text, as_version=4)
    except (ValueError, UnicodeDecodeError, nbformat.reader.NotJSONError) as e:
        lab = detect_lab(None, path, labs)
        result = Result(student, path, lab)
        result.notes.append(f"the file is not a valid notebook ({type(e).__name__}: {e}); nothing could be run")
        _zero(result, lab, "the notebook could not be read")
        result.seconds = time.monotonic() - start
        return result

    lab = detect_lab(raw, path, labs)
    result = Result(student, path, lab)
    if lab is None:
        result.notes.append(
            "could not tell which lab this notebook is (no '# Lab NN' title, no lab name in the file name)"
        )
        result.seconds = time.monotonic() - start
        return result

    with (
        tempfile.TemporaryDirectory(prefix="course-grade-") as tmp,
        tempfile.TemporaryDirectory(prefix="course-check-") as checker_dir,
    ):
        work = Path(tmp)
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(NO_NETWORK + MEMORY_LIMIT)
        shutil.copy(path, work / path.name)
        env = {
            **_kernel_env(),
            "PYTHONPATH": str(work / "site"),
            "COURSE_PROFILE": "smoke",
            "COURSE_DATA_DIR": str(root / "data"),
            "COURSE_RUNS_DIR": str(work / "runs"),
            "COURSE_MEMORY_LIMIT": str(int(memory_limit_gb * 2**30)),
            "MPLBACKEND": "Agg",
        }
        checker = Checker(lab, Path(checker_dir), root, check_timeout)
        client = NotebookClient(
            nb,
            timeout=cell_timeout,
            allow_errors=True,
            interrupt_on_timeout=True,
            kernel_name="python3",
            resources={"metadata": {"path": str(work)}},
        )
        deadline = start + notebook_timeout
        verdicts = None
        try:
            with client.setup_kernel(env=env):
                checker.wait_ready()  # every check imported before any of the submission's code runs
                try:
                    for index, cell in enumerate(list(nb.cells)):
                        if cell.cell_type != "code":
                            continue
                        if time.monotonic() > deadline:
                            result.notes.append(
                                f"the notebook time limit ({notebook_timeout} s) was reached before code cell "
                                f"{index}; the rest was not run"
                            )
                            break
                        client.execute_cell(cell, index)
                        _note_error(result, cell, index)
                except DeadKernelError:
                    result.notes.append("the kernel died (the notebook crashed Python or exited)")
                verdicts = checker.run(client.km, extra_tests, len(exercises(lab)))
        except DeadKernelError:
            result.notes.append("the kernel died (the notebook crashed Python or exited)")
        except Exception as e:  # a broken submission must never stop the run
            result.notes.append(f"running the notebook failed: {type(e).__name__}: {e}")
        finally:
            checker.close()
    if verdicts is None:
        _zero(
            result, lab, "the checks could not run: " + (result.notes[-1] if result.notes else "no verdicts came back")
        )
    else:
        for name, (status, points, max_points, message) in verdicts.items():
            result.scores[name], result.max_scores[name] = points, max_points
            result.statuses[name], result.messages[name] = status, message
    result.seconds = time.monotonic() - start
    return result


def _kernel_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "SYSTEMROOT")
    return {k: v for k, v in os.environ.items() if k in keep}


def _note_error(result: Result, cell, index: int) -> None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            ename, evalue = output.get("ename", "Error"), output.get("evalue", "")
            if ename == "NotImplementedError":
                return  # an unfinished exercise: its check says so
            reason = (
                "it ran past the time limit and was interrupted"
                if ename == "KeyboardInterrupt"
                else f"{ename}: {evalue}"
            )
            result.notes.append(f"code cell {index} failed: {reason}"[:300])
            return


def _zero(result: Result, lab: str | None, reason: str) -> None:
    for ex in exercises(lab) if lab else []:
        result.scores[ex.name], result.max_scores[ex.name] = 0.0, ex.points
        result.statuses[ex.name], result.messages[ex.name] = FAILED, reason


def find_submissions(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is neither a notebook nor a folder of notebooks")
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def write_gradebook(results: list[Result], out: Path) -> None:
    columns: list[str] = []
    for number in sorted({r.lab for r in results if r.lab}):
        columns += [ex.name for ex in exercises(number)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "lab", *columns, "total", "max"])
        for r in results:
            cells = [f"{r.scores[c]:g}" if c in r.scores else "" for c in columns]
            writer.writerow([r.student, r.lab or "", *cells, f"{r.total:g}", f"{sum(r.max_scores.values()):g}"])


def write_feedback(result: Result, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"Feedback for {result.student}: Lab {result.lab or '?'} ({result.path.name})", ""]
    for name, message in result.messages.items():
        mark = {PASSED: "✅", TODO: "⏳"}.get(result.statuses[name], "❌")
        lines.append(f"{mark} {name} ({result.scores[name]:g}/{result.max_scores[name]:g}): {message}")
    lines += ["", f"Total: {result.total:g}/{sum(result.max_scores.values()):g}"]
    if result.notes:
        lines += ["", "While running your notebook:", *(f"- {n}" for n in result.notes)]
    lines += ["", f"Graded in {result.seconds:.1f} s."]
    path = folder / f"{result.student}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def grade_folder(
    submissions: Path,
    out: Path,
    *,
    feedback: Path | None = None,
    extra_tests: Path | None = None,
    cell_timeout: int = DEFAULT_CELL_TIMEOUT,
    notebook_timeout: int = DEFAULT_NOTEBOOK_TIMEOUT,
    check_timeout: int = DEFAULT_CHECK_TIMEOUT,
    memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
    root: Path | None = None,
    progress: bool = True,
) -> list[Result]:
    root = root or Path(__file__).resolve().parent.parent
    labs = lab_notebooks(root)
    extra = extra_tests.read_text(encoding="utf-8") if extra_tests else ""
    if extra:
        compile(extra, str(extra_tests), "exec")  # an instructor's typo fails now, not 100 times later
    paths = find_submissions(submissions)
    names: dict[str, int] = {}
    results = []
    for path in tqdm(paths, desc="grading", unit="notebook", disable=not progress):
        name = student_name(path, submissions, labs)
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name}-{names[name]}"
        results.append(
            grade_one(
                path,
                name,
                labs,
                root,
                extra_tests=extra,
                cell_timeout=cell_timeout,
                notebook_timeout=notebook_timeout,
                check_timeout=check_timeout,
                memory_limit_gb=memory_limit_gb,
            )
        )
    write_gradebook(results, out)
    feedback = feedback or out.parent / "feedback"
    for r in results:
        write_feedback(r, feedback)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Grade submitted notebooks into a gradebook CSV.")
    parser.add_argument(
        "submissions", type=Path, help="a folder of .ipynb files (searched recursively) or one notebook"
    )
    parser.add_argument("--out", type=Path, default=Path("gradebook.csv"))
    parser.add_argument(
        "--feedback",
        type=Path,
        default=None,
        help="folder for one feedback file per student (default: feedback/ beside --out)",
    )
    parser.add_argument(
        "--extra-tests", type=Path, default=None, help="Python file with extra_<exercise>(fn) private checks"
    )
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, help="seconds per cell")
    parser.add_argument("--notebook-timeout", type=int, default=DEFAULT_NOTEBOOK_TIMEOUT, help="seconds per notebook")
    parser.add_argument("--check-timeout", type=int, default=DEFAULT_CHECK_TIMEOUT, help="seconds per exercise check")
    parser.add_argument(
        "--memory-limit",
        type=float,
        default=DEFAULT_MEMORY_LIMIT_GB,
        help="GB of address space per submission's kernel (0: no limit)",
    )
    args = parser.parse_args(argv)
    results = grade_folder(
        args.submissions,
        args.out,
        feedback=args.feedback,
        extra_tests=args.extra_tests,
        cell_timeout=args.cell_timeout,
        notebook_timeout=args.notebook_timeout,
        check_timeout=args.check_timeout,
        memory_limit_gb=args.memory_limit,
    )
    print(f"{'student':24} {'lab':>3} {'score':>9} {'seconds':>8}")
    for r in results:
        print(f"{r.student:24} {r.lab or '?':>3} {r.total:>4g}/{sum(r.max_scores.values()):<4g} {r.seconds:>8.1f}")
    print(f"wrote {args.out} and feedback for {len(results)} submissions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
