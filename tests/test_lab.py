import os
import subprocess
import sys
import textwrap

import pytest

from course_utils import lab as lab_module
from course_utils.lab import Lab, SetupError, choose_profile


@pytest.mark.parametrize(
    "device, env, expected",
    [
        ("cuda", {}, "gpu"),
        ("cpu", {}, "cpu"),
        ("mps", {}, "cpu"),
        ("cuda", {"CI": "true"}, "smoke"),
        ("cpu", {"COURSE_SMOKE": "1"}, "smoke"),
        ("cpu", {"COURSE_SMOKE": "0"}, "cpu"),
        ("cuda", {"CI": "true", "COURSE_PROFILE": "gpu"}, "gpu"),
        ("cpu", {"COURSE_PROFILE": "SMOKE"}, "smoke"),
    ],
)
def test_profile_choice(device, env, expected):
    assert choose_profile(device, env) == expected


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(SetupError, match="use one of gpu, cpu, smoke"):
        choose_profile("cpu", {"COURSE_PROFILE": "fast"})


def test_unknown_device_is_a_clear_error():
    with pytest.raises(SetupError, match="cuda, mps or cpu"):
        lab_module.choose_device({"COURSE_DEVICE": "tpu"})


def test_forcing_cuda_without_a_gpu_says_what_to_do():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SetupError, match="no CUDA GPU"):
        lab_module.choose_device({"COURSE_DEVICE": "cuda"})


def test_pick_returns_the_value_of_the_active_profile(data_dir):
    lab = Lab("cpu", "fp32", "smoke", 0, False, data_dir.parent, data_dir, data_dir.parent / "runs")
    assert lab.pick(gpu=1000, cpu=100, smoke=10) == 10
    with pytest.raises(TypeError):
        lab.pick(1000, 100, 10)  # keywords only, so a swapped order cannot happen silently


def test_setup_prints_one_line_and_seeds(capsys, monkeypatch):
    import random

    monkeypatch.setenv("COURSE_SMOKE", "1")
    lab = lab_module.setup(seed=7)
    first = random.random()
    lab_module.setup(seed=7)
    assert random.random() == first
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0] == out[1]
    assert out[0].startswith(f"device cpu | precision {lab_module.precision_for('cpu')} | profile smoke | seed 7")
    assert lab.data.name == "data" and (lab.data / "tinystories").is_dir()


def test_precision_follows_the_hardware_and_can_be_forced(monkeypatch):
    monkeypatch.delenv("COURSE_PRECISION", raising=False)
    monkeypatch.setattr(lab_module, "cpu_has_bf16", lambda: True)
    assert lab_module.precision_for("cpu") == "bf16"
    monkeypatch.setattr(lab_module, "cpu_has_bf16", lambda: False)
    assert lab_module.precision_for("cpu") == "fp32" and lab_module.precision_for("mps") == "fp32"
    monkeypatch.setenv("COURSE_PRECISION", "bf16")
    assert lab_module.precision_for("cpu") == "bf16"
    monkeypatch.setenv("COURSE_PRECISION", "fp8")
    with pytest.raises(SetupError, match="not a precision"):
        lab_module.precision_for("cpu")


def test_setup_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="unknown arguments"):
        lab_module.setup(quiet=True, profil="cpu")


def test_missing_data_folder_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SetupError, match="COURSE_DATA_DIR"):
        lab_module.setup(quiet=True)


def test_tiktoken_works_offline_with_a_fresh_cache(tmp_path, root):
    """A new process with an empty cache and every download made to fail still gets the lecture's ids."""
    script = textwrap.dedent(
        """
        import socket
        def no_network(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        import course_utils, tiktoken
        course_utils.setup(quiet=True)
        o200k = tiktoken.get_encoding("o200k_base")
        assert o200k.encode("Language models are interesting") == [17238, 7015, 553, 9559]
        assert o200k.encode("london school of economics") == [75, 8552, 3474, 328, 48229]
        assert tiktoken.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
        print("ok")
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "COURSE_SMOKE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_damaged_cache_file_is_replaced(tmp_path, data_dir):
    cache = lab_module.use_offline_tiktoken(data_dir, tmp_path)
    victim = next(cache.iterdir())
    victim.write_bytes(b"garbage")
    lab_module.use_offline_tiktoken(data_dir, tmp_path)
    assert victim.read_bytes() != b"garbage"


def test_damaged_shipped_rank_file_is_a_clear_error(tmp_path, data_dir):
    fake = tmp_path / "data"
    (fake / "tiktoken").mkdir(parents=True)
    for name in ("o200k_base", "cl100k_base"):
        (fake / "tiktoken" / f"{name}.tiktoken").write_bytes(b"not ranks")
    with pytest.raises(SetupError, match="damaged"):
        lab_module.use_offline_tiktoken(fake, tmp_path / "cache")
