import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Command-line flags of a tiny model and run, for the training command and the recipes.
TINY_MODEL_FLAGS = (
    "--n-layer 1 --n-head 2 --n-embd 32 --context-length 32 --batch-size 4 --warmup-steps 1 "
    "--eval-every 2 --eval-batches 1 --checkpoint-every 2"
).split()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return ROOT / "data"


@pytest.fixture(scope="session")
def chat_tok():
    """The reference base tokenizer with the chat tokens (Labs 06-09)."""
    from course_utils import sft, world
    from course_utils.lab import data_dir
    from course_utils.tokenizer import Tokenizer

    return sft.chat_tokenizer(Tokenizer.load(data_dir() / "artefacts" / world.BASE_TOKENIZER))


def notebook_namespace(path: Path, marker: str) -> dict:
    """Run a notebook's import lines, then every code cell that contains ``marker`` (its exercise
    cells: ``### BEGIN SOLUTION`` in a complete notebook, ``# YOUR CODE HERE`` in a student copy)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    imports = [line for src in code for line in src.splitlines() if line.startswith(("import ", "from "))]
    namespace: dict = {}
    exec("\n".join(imports), namespace)
    for src in code:
        if marker in src:
            exec(compile(src, path.name, "exec"), namespace)
    return namespace
