"""The public surface: every name the README, the docs pages and __all__ list resolves, every
file and link they give exists, the package has no import cycle, each choice set has one
definition, and commands own their flags."""

import ast
import glob
import importlib
import os
import re
import subprocess
import sys
import unicodedata

import pytest

import ddx
from ddx.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "ddx")


def _resolve(dotted: str):
  """``ddx.a.b.c`` as an attribute chain; a submodule that its package does not import
  eagerly (``ddx.training.classifier``) is imported, as ``import ddx.training.classifier``
  would."""
  parts = dotted.split(".")
  obj = ddx
  for i, part in enumerate(parts[1:], start=2):
    try:
      obj = getattr(obj, part)
    except AttributeError:
      name = ".".join(parts[:i])
      if _module_path(name) is None:
        raise
      obj = importlib.import_module(name)
  return obj


# The pages that document ddx: the README and every page under docs/.
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_top_level_and_module_all_resolve():
  for name in ddx.__all__:
    assert getattr(ddx, name) is not None, name
  for mod in ("schedules", "samplers", "models", "data", "guidance", "losses", "diffusion"):
    m = getattr(ddx, mod)
    assert hasattr(m, "__all__") and m.__all__, mod
    for name in m.__all__:
      assert getattr(m, name) is not None, f"ddx.{mod}.{name}"


def test_every_ddx_name_in_the_docs_resolves():
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert "ddx.sample" in readme and "ddx.samplers.Sampler" in readme
  assert len(PAGES) > 5, PAGES
  for page in PAGES:
    text = open(os.path.join(ROOT, page)).read()
    names = sorted(set(re.findall(r"\bddx(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)))
    for dotted in names:
      if dotted.startswith("ddx.data.tfds_sources") or dotted.endswith((".py", ".sh")):
        continue  # module paths run with python -m, checked by their own tests
      try:
        _resolve(dotted)
      except AttributeError as e:
        pytest.fail(f"{page} names {dotted}, which does not resolve: {e}")


def test_the_resolver_imports_submodules_and_rejects_unknown_names():
  assert _resolve("ddx.training.classifier.train").__name__ == "train"
  assert _resolve("ddx.latent.pipeline.load").__name__ == "load"
  for bad in ("ddx.classifier.train", "ddx.latent.nonexistent", "ddx.sampling.nope"):
    with pytest.raises(AttributeError):
      _resolve(bad)


# Repository paths a page may give in backticks or as a link: a file of the repository.
_PATH = re.compile(r"(?<![\w/.~<-])((?:ddx|benchmarks|configs|launch|tests|docs|\.ci)/[\w./-]*[\w/])")


def test_every_repository_path_in_the_docs_exists():
  for page in PAGES:
    text = open(os.path.join(ROOT, page)).read()
    for path in sorted(set(_PATH.findall(text))):
      assert os.path.exists(os.path.join(ROOT, path)), f"{page} names {path}, which does not exist"


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to -."""
  text = heading.strip().lower()
  kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
  return kept.replace(" ", "-")


def _anchors(path: str) -> set[str]:
  text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
  return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_link_in_the_docs_leads_somewhere():
  """Relative links name an existing file and, after #, one of its headings."""
  for page in PAGES:
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page)).read(), flags=re.S)
    here = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
      if re.match(r"[a-z]+:", target):
        continue  # an external address
      path, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
      assert os.path.exists(full), f"{page} links to {target}: no file {full}"
      if anchor:
        assert anchor in _anchors(full), f"{page} links to {target}: no such heading in {path or page}"


def _imports(path: str, modname: str) -> set[str]:
  """ddx modules one file imports, at module level or inside functions (`from ddx import x`
  names the submodule ddx.x when it is one, else the package)."""
  tree = ast.parse(open(path).read())
  out = set()
  pkg = modname if path.endswith("__init__.py") else modname.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "ddx"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
      if base.split(".")[0] != "ddx":
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if _module_path(sub) else base)
  return out


def _module_path(modname: str) -> str | None:
  rel = modname.replace(".", os.sep)
  for cand in (os.path.join(ROOT, rel + ".py"), os.path.join(ROOT, rel, "__init__.py")):
    if os.path.isfile(cand):
      return cand
  return None


def _import_graph() -> dict[str, set[str]]:
  graph = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
        graph[mod] = _imports(path, mod) - {mod}
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of imports, ignoring a package's ``__init__`` importing its own submodules."""
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if n.startswith(m + "."):
        continue
      if state.get(n) == 1:
        return stack[stack.index(n) :] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle_in_the_package():
  """Function-level imports count: a cycle hidden inside a function is still a cycle."""
  cycle = _find_cycle(_import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_function_level_imports(tmp_path):
  a, b = tmp_path / "a.py", tmp_path / "b.py"
  a.write_text("from ddx import schedules\n")
  b.write_text("def f():\n  from ddx import sampling\n")
  assert _imports(str(a), "ddx.x") == {"ddx.schedules"} and _imports(str(b), "ddx.y") == {"ddx.sampling"}
  assert _find_cycle({"ddx.a": {"ddx.b"}, "ddx.b": {"ddx.c"}, "ddx.c": {"ddx.a"}}) == [
    "ddx.a",
    "ddx.b",
    "ddx.c",
    "ddx.a",
  ]
  assert _find_cycle({"ddx.p": {"ddx.p.m"}, "ddx.p.m": {"ddx.q"}, "ddx.q": set()}) is None


# The layers of the package, top (0, the pure core) to bottom (3, the command line): a module
# imports from its own layer or the layers above it, never from one below.
LAYERS = {
  "ddx": 0,
  "ddx.schedules": 0,
  "ddx.diffusion": 0,
  "ddx.edm": 0,
  "ddx.losses": 0,
  "ddx.samplers": 0,
  "ddx.sampling": 0,
  "ddx.guidance": 0,
  "ddx.edit": 0,
  "ddx.parallel": 0,
  "ddx.images": 0,
  "ddx.storage": 0,
  "ddx.__main__": 3,
  "ddx.models": 1,
  "ddx.data": 1,
  "ddx.eval": 1,
  "ddx.training": 2,
  "ddx.latent": 2,
  "ddx.cli": 3,
}


def _layer(mod: str) -> int:
  parts = mod.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in LAYERS:
      return LAYERS[".".join(parts[:i])]
  raise KeyError(f"{mod}: not in any layer (add its package to LAYERS)")


def test_imports_point_down_the_layers():
  graph = _import_graph()
  up = sorted(
    f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
    for m, deps in graph.items()
    for n in deps
    if _layer(n) > _layer(m)
  )
  assert not up, "\n".join(up)


def test_the_top_level_holds_the_core_only():
  loose = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py"))
  assert loose == [
    "__init__",
    "__main__",
    "diffusion",
    "edit",
    "edm",
    "guidance",
    "images",
    "losses",
    "parallel",
    "sampling",
    "schedules",
    "storage",
  ], loose


# The literal that declares each set; single values may appear elsewhere as defaults.
CHOICE_SETS = {
  "schedule names": ('("linear", "scaled_linear", "cosine", "sigmoid")', "ddx/schedules.py"),
  "variance kinds": ('("fixed_small", "fixed_large", "learned_range")', "ddx/diffusion.py"),
  "sampler names": ('"dpm_solver++": (dpm_solver.make', "ddx/samplers/__init__.py"),
  "spacings": ('("leading", "trailing", "linspace"', "ddx/samplers/grids.py"),
  "prediction types": ('("eps", "x0", "v")', "ddx/diffusion.py"),
  "dataset names": ('"fashion_mnist"', "ddx/data/tfds_sources.py"),
  "optimizers": ('("adam", "adamw")', "ddx/training/step.py"),
  "loss weightings": ('("uniform", "min_snr")', "ddx/losses.py"),
}


@pytest.mark.parametrize("what", sorted(CHOICE_SETS))
def test_each_choice_set_is_declared_once(what):
  needle, owner = CHOICE_SETS[what]
  hits = []
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        code = "\n".join(l.split("#")[0] for l in open(path).read().splitlines())  # comments may mention names
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # and so may docstrings
        if needle in code:
          hits.append(os.path.relpath(path, ROOT))
  assert hits == [owner], f"{what}: {needle} appears in {hits}, expected only {owner}"


def test_every_command_has_its_own_flags():
  seen = set()
  for name, path in cli.COMMANDS.items():
    module = __import__(path, fromlist=["main"])
    assert module.HELP and callable(module.main), name
    assert id(module.FLAGS) not in seen, f"{name} shares its FlagValues"
    seen.add(id(module.FLAGS))


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["train", "--workdir=/tmp/ddx-never", "--steps=5"], "steps"),
    (["sample", "--workdir=/tmp/ddx-never", "--config=configs/digits.py"], "config"),
    (["info", "--num=3"], "num"),
    (["convert", "--sampler=ddim"], "sampler"),
    (["sample", "--workdir=/tmp/ddx-never", "extra"], "unexpected arguments"),
    (["bogus"], "unknown command"),
  ],
)
def test_a_flag_of_another_command_is_an_error(argv, needle, ddx_cli):
  code, _, err = ddx_cli(*argv)
  assert code == 2, (argv, err)
  first = err.strip().splitlines()[0]
  assert first.startswith("ddx") and "error" in first and needle in first and "Traceback" not in err, err
  assert not os.path.exists("/tmp/ddx-never")


def test_the_console_entry_point_prints_one_line_and_exits_2():
  p = subprocess.run(
    [sys.executable, "-m", "ddx", "train", "--workdir=/tmp/ddx-never", "--steps=5"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
  )
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and "steps" in p.stderr, p.stderr
  assert "Traceback" not in p.stderr and not os.path.exists("/tmp/ddx-never")
