"""The GPU rehearsal script (scripts/gpu_rehearsal.sh) at toy sizes on the CPU: the steps a
GPU machine runs (pre-training -> export -> fine-tuning from it with an evaluation and a
checkpoint midway -> resume -> export), without Ray or MLflow, as that machine has neither."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`

ROOT = Path(__file__).resolve().parents[1]


# What the lent GPU machine lacks and cannot be carried there (../shared/FACTS.md): the script must
# run with each of these failing to import.
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "boto3", "botocore", "moto", "natten", "xformers")
BLOCKER = f"""import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_MACHINE!r}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, _Absent())
"""


def test_rehearsal_smoke_runs_every_phase(tmp_path):
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHON=sys.executable, REHEARSAL_TIMEOUT="400", PYTHONPATH=str(tmp_path / "absent"))
    probe = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert "not on the GPU machine: mlflow" in probe.stderr  # the blocker is in force
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_rehearsal.sh"), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[rehearsal]")]
    text = "\n".join(lines)
    assert "pretrain_imagenet_tiny: 3 steps" in text and "top-1" in text
    assert "finetune_ade20k_tiny to step 4: 4 steps" in text and "evaluation at step 4: mIoU" in text
    assert "finetune_ade20k_tiny resumed to step 6" in text and "evaluation at step 6: mIoU" in text
    assert "images/s" in text and "peak memory" in text and "TFLOP/s" in text
    launches = str(tmp_path / "runs" / "finetune_ade20k_tiny" / "checkpoints")
    assert re.search(rf"export: {re.escape(launches)}/\d{{8}}-\d{{6}}-[0-9a-f]{{6}}/step00000006", text), text
    assert "loaded 195 tensors; missing 0; unexpected 0" in proc.stderr  # the pre-trained backbone, whole
    assert not (tmp_path / "mlruns.db").exists() and not list(tmp_path.glob("**/mlruns*"))  # tracking off
