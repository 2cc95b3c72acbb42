"""The README's API example runs and prints what it says."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_api_example_runs(capsys):
  text = open(os.path.join(ROOT, "README.md")).read()
  code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  x0 = np.asarray(scope["x0"])
  # the printed numbers the README states (DDIM-50 under-disperses a Gaussian: 0.18 vs 0.2)
  assert abs(x0.mean() - 0.5) < 0.005 and abs(x0.std() - 0.18) < 0.005, (x0.mean(), x0.std())
