"""The runtime never imports torch: tune, eval and predict run in a process where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from .conftest import needs_export

pytestmark = needs_export

GUARD = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "transformers":
                raise ImportError("torch imported at run time: " + name)
            return None
    sys.meta_path.insert(0, _NoTorch())
    from cliptune_ort.cli import main
    rc = main(sys.argv[1:])
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    sys.exit(rc)
""")


def _run(args):
    return subprocess.run([sys.executable, "-c", GUARD, *args], capture_output=True, text=True, timeout=600)


def test_tune_eval_predict_never_import_torch(splade_dir, tmp_path):
    run = tmp_path / "run"
    r = _run(["tune", "--task", "sst2", "--model-dir", str(splade_dir), "--budget", "40", "--popsize", "4",
              "--eval-every", "20", "--d", "20", "--out", str(run), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["calls"] == 40
    r = _run(["eval", str(run), "--split", "dev"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 32
    r = _run(["predict", str(run), "--text", "a wonderful, moving film", "--text", "dull and tedious"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 2 and all(abs(sum(x["probs"].values()) - 1) < 1e-5 for x in rows)


def test_guard_really_blocks_torch():
    r = subprocess.run([sys.executable, "-c", GUARD.replace("from cliptune_ort.cli import main", "import torch")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "torch imported at run time" in r.stderr
