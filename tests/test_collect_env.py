import subprocess
import sys

from psalm.collect_env import collect_env_info


def test_collect_env_reports_the_stack():
    info = collect_env_info()
    for name in ("torch", "detectron2 build", "transformers", "timm", "MSDeformAttn backend (auto)"):
        assert name in info
    assert "not importable" not in info.split("detectron2 build")[0]


def test_collect_env_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "psalm.collect_env"], capture_output=True, text=True, check=True)
    assert "transformers" in out.stdout and "detectron2" in out.stdout
