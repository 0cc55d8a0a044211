"""`immunizer --device`: where a one-process command runs, pinned through the environment before torch starts (so
that TRL's trainer, which takes the first visible GPU, follows it), and its bad values."""
import pytest

from immunizer.errors import ImmunizerError
from immunizer.launch import pin_device

from helpers import run_cli


@pytest.fixture
def env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "IMMUNIZER_DEVICE", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so that what pin_device sets is undone after the test
        monkeypatch.delenv(name)
    return monkeypatch


def test_cpu_hides_every_gpu(env):
    import os

    pin_device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["IMMUNIZER_DEVICE"] == "cpu"


@pytest.mark.parametrize("visible, spec, pinned", [(None, "cuda", "0"), (None, "cuda:3", "3"), ("2,5", "cuda:1", "5"),
                                                   ("7", "CUDA", "7")])
def test_a_gpu_is_the_only_one_visible(env, visible, spec, pinned):
    import os

    if visible is not None:
        env.setenv("CUDA_VISIBLE_DEVICES", visible)
    pin_device(spec)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == pinned and os.environ["IMMUNIZER_DEVICE"] == "cuda"


@pytest.mark.parametrize("spec, visible, launched, says", [
    ("tpu", None, False, "is not a device; use cpu, cuda or cuda:N"),
    ("cpu:1", None, False, "is not a device"),
    ("cuda:2", "0,1", False, "shows 2 GPU(s); choose cuda:0 to cuda:1"),
    ("cuda", "", False, "hides every GPU; unset it"),
    ("cuda", None, True, "does not apply under `accelerate launch`"),
])
def test_bad_devices_are_refused_with_the_fix(env, spec, visible, launched, says):
    if visible is not None:
        env.setenv("CUDA_VISIBLE_DEVICES", visible)
    if launched:
        env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ImmunizerError, match=says.replace("(", r"\(").replace(")", r"\)")):
        pin_device(spec)


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_by_name(env, tmp_path):
    """The real command: on a machine without a usable GPU, `--device cuda` stops with the device named, before
    anything is written (a machine with a GPU runs the fine-tune there instead)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "ft"
    proc = run_cli("--device", "cuda", "finetune", "--model", "tiny", "--data", "arithmetic", "--samples", "4",
                   "--batch-size", "4", "--out", str(out), check=False, fresh=True)
    assert proc.returncode == 2
    assert "(--device / IMMUNIZER_DEVICE) but this machine has 0 usable CUDA device(s)" in proc.stderr
    assert not (out / "model").exists()


def test_cpu_runs_the_command(env, tmp_path):
    proc = run_cli("--device", "cpu", "finetune", "--model", "tiny", "--data", "arithmetic", "--samples", "4",
                   "--batch-size", "4", "--out", str(tmp_path / "ft"), fresh=True)
    assert '"steps": 1' in proc.stdout and (tmp_path / "ft" / "model").is_dir()
