"""Everything a notebook needs before its first real cell: device, precision, profile, seeds,
paths, and offline tiktoken.

``lab = course_utils.setup()`` prints one line and returns a :class:`Lab`. Sizes that depend on
the machine are chosen with ``lab.pick(gpu=..., cpu=..., smoke=...)``.

Profiles (the budget for a whole notebook):

========  ==========================================  ==============================
profile   chosen when                                 budget
========  ==========================================  ==============================
``gpu``   a CUDA device is present                    the lab's T4 budget
``cpu``   no CUDA device, not CI                      <= 15 min on a 4-core laptop
``smoke`` ``COURSE_SMOKE=1`` or ``CI`` is set           <= 3 min on 2 cores
========  ==========================================  ==============================

``COURSE_PROFILE`` forces a profile, ``COURSE_DEVICE`` a device, ``COURSE_PRECISION`` a precision,
``COURSE_DATA_DIR`` the data folder, ``COURSE_RUNS_DIR`` the folder for your own artefacts (default
``runs/`` beside ``data/``).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

PROFILES = ("gpu", "cpu", "smoke")
T = TypeVar("T")

#: ``owner/name`` of the course's public GitHub repository: the one place it is written. Badges and
#: Colab set-up cells are generated from it (``python -m course_utils.publish``).
REPOSITORY = "llm-labs/llm-labs"
#: Branch the badges point at.
BRANCH = "main"


def repository_url() -> str:
    return f"https://github.com/{REPOSITORY}"


def colab_clone_dir() -> str:
    """Folder the set-up cell clones the course into on Colab."""
    return "/content/" + REPOSITORY.split("/")[-1]


# tiktoken looks in its cache for a file named sha1(url) before it downloads `url`, and checks
# the file's sha256 against the hash it expects. These are the urls and hashes of
# tiktoken_ext/openai_public.py; the rank files themselves ship in data/tiktoken/.
TIKTOKEN_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


class SetupError(RuntimeError):
    """The environment is missing something a lab needs; the message says what to do."""


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def choose_profile(device_type: str, env: dict[str, str] | None = None) -> str:
    """``COURSE_PROFILE`` if set; else ``smoke`` under CI or ``COURSE_SMOKE``; else by device."""
    env = os.environ if env is None else env
    forced = env.get("COURSE_PROFILE", "").strip().lower()
    if forced:
        if forced not in PROFILES:
            raise SetupError(f"COURSE_PROFILE={forced!r} is not a profile; use one of {', '.join(PROFILES)}")
        return forced
    if _truthy(env.get("COURSE_SMOKE")) or _truthy(env.get("CI")):
        return "smoke"
    return "gpu" if device_type == "cuda" else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX, read from /proc/cpuinfo on
    Linux); elsewhere False. Where it does, bf16 autocast trains about half again as fast as fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_for(device) -> str:
    """The precision to train in on ``device`` (a ``torch.device`` or its name): bf16 autocast on CUDA
    compute capability >= 8.0 (A100, L4, H100) and on CPUs with native bf16, fp16 autocast with a
    gradient scaler on older GPUs (T4, V100: no bf16 tensor cores), fp32 elsewhere (MPS, other CPUs).
    ``COURSE_PRECISION`` forces one."""
    import torch  # optional here: the tokeniser lab runs without torch, and never asks

    forced = os.environ.get("COURSE_PRECISION", "").strip().lower()
    if forced:
        if forced not in ("bf16", "fp16", "fp32"):
            raise SetupError(f"COURSE_PRECISION={forced!r} is not a precision; use bf16, fp16 or fp32")
        return forced
    device = torch.device(device)
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def choose_device(env: dict[str, str] | None = None) -> tuple[str, str]:
    """Return ``(device, precision)``: CUDA, then Apple MPS, then CPU.

    Precision follows the hardware (:func:`precision_for`).
    """
    env = os.environ if env is None else env
    try:
        import torch  # optional here: the tokeniser lab needs no torch
    except ImportError:
        return "cpu", "fp32"
    forced = env.get("COURSE_DEVICE", "").strip().lower()
    if forced and forced not in ("cuda", "mps", "cpu"):
        raise SetupError(f"COURSE_DEVICE={forced!r} is not a device; use cuda, mps or cpu")
    if forced == "cuda" and not torch.cuda.is_available():
        raise SetupError(
            "COURSE_DEVICE=cuda but PyTorch sees no CUDA GPU (on Colab: Runtime > Change runtime type > T4 GPU)"
        )
    if forced in ("", "cuda") and torch.cuda.is_available():
        return "cuda", precision_for("cuda")
    mps = getattr(torch.backends, "mps", None)
    if forced in ("", "mps") and mps is not None and mps.is_available():
        return "mps", precision_for("mps")
    return "cpu", precision_for("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch  # optional here: the tokeniser lab needs no torch

        torch.manual_seed(seed)  # also seeds every CUDA device
    except ImportError:
        pass


def find_root(start: Path | None = None) -> Path | None:
    """The course folder: the first of the working directory and its parents, the package's
    parents, a clone inside the working directory (where the Colab set-up cell puts it) and the
    Colab clone that holds ``data/tinystories``. ``COURSE_DATA_DIR`` wins."""
    env_dir = os.environ.get("COURSE_DATA_DIR")
    if env_dir:
        return Path(env_dir).expanduser().resolve().parent
    start = (start or Path.cwd()).resolve()
    clone = Path(colab_clone_dir())
    candidates = [start, *start.parents, *Path(__file__).resolve().parents, start / clone.name, clone]
    for candidate in candidates:
        if (candidate / "data" / "tinystories").is_dir():
            return candidate
    return None


def data_dir() -> Path:
    """The shipped ``data/`` folder; a clear error if it cannot be found."""
    env_dir = os.environ.get("COURSE_DATA_DIR")
    if env_dir:
        path = Path(env_dir).expanduser().resolve()
        if not path.is_dir():
            raise SetupError(f"COURSE_DATA_DIR={env_dir} is not a folder; point it at the course's data/ folder")
        return path
    root = find_root()
    if root is None:
        raise SetupError(
            "cannot find the course's data/ folder. Run the notebook from inside a clone of "
            f"{repository_url()} (git clone it, then `make lab`), or set COURSE_DATA_DIR "
            "to the path of its data/ folder."
        )
    return root / "data"


def runs_dir(data: Path | None = None) -> Path:
    """The folder for the student's own artefacts, caches and runs: ``COURSE_RUNS_DIR`` when set,
    else ``runs/`` beside the ``data/`` folder."""
    if os.environ.get("COURSE_RUNS_DIR"):
        return Path(os.environ["COURSE_RUNS_DIR"]).expanduser()
    return (data or data_dir()).parent / "runs"


def use_offline_tiktoken(data: Path, cache_dir: Path | None = None) -> Path:
    """Make ``tiktoken.get_encoding("o200k_base")`` and ``("cl100k_base")`` work with no network.

    Copies the shipped rank files into tiktoken's cache under the names tiktoken looks for
    (sha1 of the download url) and points ``TIKTOKEN_CACHE_DIR`` there. tiktoken still checks
    each file's sha256 itself, so a damaged copy is never used silently.
    """
    if cache_dir is None:
        cache_dir = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or Path.home() / ".cache" / "course_utils" / "tiktoken")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, sha256) in TIKTOKEN_FILES.items():
        source = data / "tiktoken" / f"{name}.tiktoken"
        target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
            continue
        if not source.exists():
            raise SetupError(f"{source} is missing; it ships with the course (git checkout data/tiktoken)")
        if hashlib.sha256(source.read_bytes()).hexdigest() != sha256:
            raise SetupError(f"{source} is damaged (sha256 differs from tiktoken's); restore it with git checkout")
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return cache_dir


@dataclass(frozen=True)
class Lab:
    """What :func:`setup` decided. ``pick`` chooses a value for the active profile."""

    device: str
    precision: str
    profile: str
    seed: int
    colab: bool
    root: Path | None
    data: Path
    runs: Path

    def pick(self, *, gpu: T, cpu: T, smoke: T) -> T:
        """The value for the active profile, e.g. ``steps = lab.pick(gpu=2000, cpu=300, smoke=20)``."""
        return {"gpu": gpu, "cpu": cpu, "smoke": smoke}[self.profile]

    @property
    def smoke(self) -> bool:
        return self.profile == "smoke"

    def describe(self) -> str:
        return f"device {self.device} | precision {self.precision} | profile {self.profile} | seed {self.seed}" + (
            " | Colab" if self.colab else ""
        )


def setup(seed: int = 1337, *, quiet: bool = False, **overrides: Any) -> Lab:
    """Choose device, precision and profile, seed everything, find the data, enable offline
    tiktoken, and print one line saying what was chosen.

    ``overrides`` may set ``profile`` or ``device`` directly (as the environment variables do).
    """
    env = dict(os.environ)
    if "profile" in overrides:
        env["COURSE_PROFILE"] = overrides.pop("profile")
    if "device" in overrides:
        env["COURSE_DEVICE"] = overrides.pop("device")
    if overrides:
        raise TypeError(f"setup() got unknown arguments {sorted(overrides)}; it takes seed, quiet, profile, device")
    device, precision = choose_device(env)
    profile = choose_profile(device, env)
    if device == "cuda":
        import torch  # optional here: only a CUDA machine comes this way

        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(seed)
    data = data_dir()
    root = data.parent
    use_offline_tiktoken(data)
    lab = Lab(device, precision, profile, seed, on_colab(), root, data, runs_dir(data))
    if not quiet:
        print(lab.describe())
    return lab


def online(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host`` can be reached: optional online cells run only then, and skip otherwise."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
