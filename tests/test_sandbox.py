"""The grader's wire format carries data only, exactly; checks run against functions in a real kernel."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT

from course_utils import sandbox
from course_utils.checks import FAILED, PASSED


def same(a, b) -> bool:
    """Equal values of exactly the same types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


VALUES = [
    None,
    True,
    3,
    2**70,
    0.1,
    float("inf"),
    float("nan"),
    "naïve ✓",
    b"\x00\xff",
    (1, (2.0, "x")),
    [1, [2, 3]],
    {(104, 105): 256, (256, 33): 257},  # tuple keys, in order
    {"b": 1, "a": 2},
    {1, 2, 3},
    frozenset({"x"}),
    np.float64(0.5),
    np.float32(0.25),
    np.int64(7),
    np.arange(6, dtype=np.float32).reshape(2, 3),
    torch.tensor(1.5),  # a 0-dim tensor is not a float
    torch.randn(2, 3, dtype=torch.float64),
    torch.tensor([[True, False]]),
    torch.tensor([1.0, -float("inf")], dtype=torch.bfloat16),
    torch.empty(0, 4),
]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ + str(i) for i, v in enumerate(VALUES)])
def test_values_cross_the_wire_unchanged(value):
    wire = json.loads(sandbox.dumps(sandbox.encode(value)))
    assert same(sandbox.decode(wire), value)


class Yes(dict):
    def __eq__(self, other):
        return True

    __hash__ = None


def test_only_plain_data_comes_back():
    forged = Yes(a=1)
    back = sandbox.decode(sandbox.encode(forged))
    assert type(back) is dict and back != {"z": 0}  # the forged __eq__ did not cross
    with pytest.raises(sandbox.Unsendable, match="Gen|generator"):
        sandbox.encode(x for x in range(3))

    class Mine:
        pass

    with pytest.raises(sandbox.Unsendable) as e:
        sandbox.encode([1, Mine()])
    assert e.value.type_name == "Mine"
    with pytest.raises(ValueError, match="not plain data"):  # an object tag is refused on the checker's side
        sandbox.decode({"$object": "GPT", "config": {}})


def test_gradients_computed_elsewhere_reach_the_checkers_tensor():
    logits = torch.randn(3, requires_grad=True)
    remote_value = torch.tensor(2.0)
    known = torch.tensor([0.5, 0.0, -1.0])
    result = sandbox._AttachGradients.apply(remote_value, [known], logits)
    assert result.item() == 2.0
    (grad,) = torch.autograd.grad(result, logits)
    assert torch.equal(grad, known)


# Complete solutions, taken from the labs' notebooks, run in a real kernel and checked from this process.
PREAMBLE = """
import math
import torch
import torch.nn as nn
import torch.nn.functional as F
import course_utils.model as gpt
from course_utils import rl, sft
from course_utils.model import KVCache, GPT, GPTConfig
IGNORE = -100
"""


def solution(notebook: str, signature: str) -> str:
    nb = json.loads((ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))
    (source,) = [
        "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and signature in "".join(c["source"])
    ]
    return source


# exercises whose arguments are objects, whose inputs must stay unchanged, or whose result is differentiated
AWKWARD = {
    "01": ("01_tokenisation.ipynb", ["merge_pair"]),
    "03": ("03_transformer.ipynb", ["generate_cached"]),
    "04": ("04_pretraining.ipynb", ["optimisation_step"]),
    "06": ("06_sft.ipynb", ["render_conversation", "masked_loss"]),
    "09": ("09_rl_reasoning.ipynb", ["grpo_loss"]),
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    sources = [PREAMBLE] + [solution(nb, f"def {name}(") for nb, names in AWKWARD.values() for name in names]
    sources.append(
        "def mutating_merge(ids, pair, new_id):\n"
        "    out = merge_pair(list(ids), pair, new_id)\n"
        "    ids[:] = out\n"
        "    return out\n"
        "def yes_merge(ids, pair, new_id):\n"
        "    class Yes(list):\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "    return Yes()\n"
    )
    for source in sources:
        reply = kc.execute_interactive(source, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
    folder = tmp_path_factory.mktemp("checker")
    process = getattr(km.provisioner, "process", None)
    kernel = sandbox.Kernel(km.connection_file, getattr(process, "pid", None), folder)
    yield kernel
    kernel.close()
    kc.stop_channels()
    km.shutdown_kernel(now=True)


@pytest.mark.parametrize("lab", sorted(AWKWARD))
def test_object_and_gradient_exercises_pass_across_the_boundary(kernel, lab):
    names = AWKWARD[lab][1]
    results = sandbox.run_checks(lab, kernel, "", 60, names=names)
    assert {name: results[name][0] for name in names} == dict.fromkeys(names, PASSED), results


def test_changed_inputs_and_forged_results_fail_across_the_boundary(kernel):
    def verdict(name):
        return sandbox.run_checks("01", kernel, "", 60, names=["merge_pair"], aliases={"merge_pair": name})[
            "merge_pair"
        ]

    status, _, _, message = verdict("mutating_merge")
    assert status == FAILED and "changed the list" in message
    status, _, _, message = verdict("yes_merge")
    assert status == FAILED and "expected" in message
    status, _, _, message = verdict("no_such_function")
    assert status == FAILED and "no function named" in message
