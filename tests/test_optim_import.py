"""pycma is imported without matplotlib (a start-up cost of every run) and behaves the same."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "matplotlib_first":
        import matplotlib.pyplot
    from cliptune_ort.optim import digest, make_optimizer
    opt = make_optimizer("cma", 12, 6, 1.0, 3)
    for _ in range(3):
        z = opt.ask()
        opt.tell(z, (z ** 2).sum(1))
    had = "matplotlib" in sys.modules
    import matplotlib.pyplot as plt  # still importable afterwards (the convergence plot)
    import cma
    print(json.dumps({"digest": digest(opt.ask()), "matplotlib_during": had, "plt": hasattr(plt, "figure"),
                      "cma_plot": cma.s._pyplot is not None}))
""")


def _run(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cma_without_matplotlib_behaves_the_same():
    lean, full = _run("plain"), _run("matplotlib_first")
    assert lean["matplotlib_during"] is False and lean["plt"] is True
    assert full["cma_plot"] is True  # matplotlib loaded first: pycma's plotting is left alone
    assert lean["digest"] == full["digest"]
