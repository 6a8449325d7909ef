"""The Colab path, simulated offline: a fresh Python environment that already has torch (as Colab's
does), the ``google.colab`` module present, and the repository address pointed at a clone of this
repository. The notebook's own set-up cell must clone the course, install the package without
touching torch, find ``data/``, and let the notebook's next cells run; a restarted kernel must skip
the clone and pick up what the first session saved."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

from course_utils import lab as course_lab
from course_utils import publish

NOTEBOOK = ROOT / "notebooks" / "01_tokenisation.ipynb"

# Runs inside the simulated Colab kernel: marks google.colab as imported, records every subprocess
# the set-up cell starts, then runs the given code cells in one namespace, as a kernel would.
KERNEL = textwrap.dedent(
    """
    import json, subprocess, sys, types
    sys.modules["google.colab"] = types.ModuleType("google.colab")
    started = []
    _run = subprocess.run
    def run(args, *rest, **kw):
        started.append(list(args))
        return _run(args, *rest, **kw)
    subprocess.run = run
    cells = json.load(open(sys.argv[1]))
    namespace = {}
    for source in cells:
        exec(compile(source, "<cell>", "exec"), namespace)
    import course_utils, torch
    lab = namespace["lab"]
    print("REPORT " + json.dumps(dict(started=started, package=course_utils.__file__, torch=torch.__file__,
                                      root=str(lab.root), data=str(lab.data), runs=str(lab.runs), colab=lab.colab)))
    """
)


def code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def run_kernel(python: Path, cells: list[str], cwd: Path, env: dict, tmp: Path) -> dict:
    cells_file = tmp / "cells.json"
    cells_file.write_text(json.dumps(cells))
    done = subprocess.run(
        [str(python), "-c", KERNEL, str(cells_file)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return {**json.loads(report[-1][len("REPORT ") :]), "stdout": done.stdout}


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the course as a git repository to clone")
def test_the_colab_set_up_cell_installs_the_course_and_a_restart_picks_up_saved_work(tmp_path):
    import torch

    clone = course_lab.colab_clone_dir()
    setup = code_cells(NOTEBOOK)[0]
    assert setup == publish.setup_cell_source() and clone in setup and course_lab.repository_url() in setup
    content = tmp_path / "content"  # Colab's working folder; the clone lands inside it
    content.mkdir()
    target = content / Path(clone).name
    setup = setup.replace(f'"{clone}"', json.dumps(str(target)))

    # a bare environment whose only packages are this one's (torch among them), seen but not owned
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own, "colab_preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURSE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        COURSE_SMOKE="1",
        MPLBACKEND="Agg",
        # the repository address resolves to this clone; pip may not reach an index
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0=f"url.{ROOT.as_uri()}.insteadOf",
        GIT_CONFIG_VALUE_0=course_lab.repository_url(),
        PIP_NO_INDEX="1",
        PIP_NO_BUILD_ISOLATION="0",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    cells = code_cells(NOTEBOOK)
    first = run_kernel(python, [setup, *cells[1:]], content, env, tmp_path)

    commands = [c[:3] for c in first["started"]]
    assert commands[0] == ["git", "clone", "--depth"] and commands[1][1:] == ["-m", "pip"], first["started"]
    assert Path(first["package"]).is_relative_to(own), "the course must be imported from the installed package"
    assert Path(first["torch"]) == Path(torch.__file__), "the preinstalled torch must be kept"
    assert not list(Path(own).glob("torch*")), "pip must not install a second torch"
    assert first["colab"] and Path(first["root"]) == target and Path(first["data"]) == target / "data"
    assert (target / "runs" / "tokenizer.json").exists(), "Lab 01 saves the student's tokenizer in runs/"

    # the kernel restarts (the folder survives): no second clone or install, the saved tokenizer is used
    again = "from course_utils import tokenizer as bpe\nbpe.load_course_tokenizer(lab.runs, lab.data)"
    second = run_kernel(python, [setup, again], content, env, tmp_path)
    assert second["started"] == [] and Path(second["root"]) == target
    assert f"using your own tokenizer: {target / 'runs' / 'tokenizer.json'}" in second["stdout"]
