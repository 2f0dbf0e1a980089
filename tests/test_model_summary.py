import json
import subprocess
import sys

from .conftest import REPO_ROOT


def test_full_size_model_summary_on_meta_device():
    """The paper's config builds on the meta device; per-module counts match the official model
    (spec section 6: Phi 1.4145 B, Swin-B 87.4 M incl. 0.5 M index buffers, projector 62.9 M)."""
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/model_summary.py"), "--config-file",
         str(REPO_ROOT / "configs/coco/psalm_swin_base_phi15.yaml")],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    rows = {r["module"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    assert rows["llm"]["parameters"] == 1_414_520_832
    assert rows["projector"]["parameters"] == 62_941_187
    assert rows["pixel_decoder"]["parameters"] == 5_544_896
    assert rows["backbone"]["trainable"] == 0  # frozen Swin
    assert rows["total"]["parameters"] == sum(r["parameters"] for k, r in rows.items() if k != "total")
