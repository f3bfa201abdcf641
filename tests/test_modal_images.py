"""Every Modal function imports only what its image's lock file installs.

An image is built from modal_jobs/locks/<image>.txt alone (modal_jobs/app.py), so a module a stage imports that
is not in that lock fails on Modal only, after the stages before it have run and billed (the consistency stage
imported `openai` on a GPU image without it). Two complementary views of "what a stage imports":

- static: the AST of modal_jobs, from the Modal function's body through the functions and classes it reaches
  (one module to the next through `from modal_jobs.x import y` and `x.y`), every import statement, including
  those inside functions. It sees the GPU-only paths (unsloth, vllm) that no CPU run takes.
- dynamic: the embedded default pipeline run once, its job processes (`python -m modal_jobs.runner STAGE ...`)
  recording every import statement that modal_jobs code executes. It sees what the AST cannot (imports by a
  name computed at run time), on the paths this CPU takes.

Modules map to distributions through this environment's metadata (importlib.metadata.packages_distributions());
a module not installed here (unsloth, vllm) must be spelled like its distribution. The standard library is
exempt. Imports by third-party libraries of their own dependencies are the resolver's business, not checked here.

Run as: python -m pytest tests/test_modal_images.py   (after `python -m scripts.lock_images`)
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import modal
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import modal_jobs
import modal_jobs.app as modal_app
from modal_jobs.jobs import JOBS
from tests import whole_runs
from tests.whole_runs import whole_run

PACKAGE_DIR = Path(modal_jobs.__file__).parent
REPO = PACKAGE_DIR.parent

# The image of every Modal function that is not a stage of STAGE_SPECS.
OTHER_FUNCTIONS = {"vllm_server": "vllm"}
# Code that runs in an image without being a Modal function: each evaluation's vLLM server, a Sandbox on the vLLM
# image started by the `serve` stage, runs modal_jobs.serve (`python -m modal_jobs.serve`, or `vllm serve` with
# its argv built there). The whole module counts, as it may be run as a script.
SANDBOXES = {"evaluation-server": ("vllm", ["modal_jobs.serve"])}
# Executables the functions run, by the distribution that installs them (the AST sees imports, not argv).
EXECUTABLES = {"vllm": {"vllm": "vllm"}}

# Imports that may be missing from a lock: (image, top-level module) -> why that is fine. Only imports whose
# failure the code handles belong here; keep each reason next to the line that handles it.
ALLOWED_MISSING: dict[tuple[str, str], str] = {}


# --- locks --------------------------------------------------------------------------------------------------


def image_of(function: str) -> str:
    if function in OTHER_FUNCTIONS:
        return OTHER_FUNCTIONS[function]
    images = {id(modal_app.cpu_image): "cpu", id(modal_app.gpu_image): "gpu", id(modal_app.vllm_image): "vllm"}
    return images[id(modal_app.STAGE_SPECS[function].image)]


@cache
def locked(image: str) -> dict[str, str]:
    """canonical distribution name -> version, from the image's lock file."""
    pins = {}
    for line in Path(modal_app.lock_path(image)).read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement and not requirement.startswith("-"):
            parsed = Requirement(requirement)
            (specifier,) = parsed.specifier
            pins[canonicalize_name(parsed.name)] = specifier.version
    return pins


def input_requirements(path: Path) -> list[Requirement]:
    requirements = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            requirements += input_requirements(path.parent / line[3:].strip())
        elif line:
            requirements.append(Requirement(line))
    return requirements


@pytest.mark.parametrize("image", list(modal_app.IMAGE_PYTHON))
def test_each_lock_is_resolved_from_its_inputs_for_its_python(image):
    lock = Path(modal_app.lock_path(image))
    header = lock.read_text().splitlines()[:2]
    assert header[1].strip("# ") == f"python -m scripts.lock_images {image}", "the lock says how to regenerate it"
    pins = locked(image)
    for requirement in input_requirements(lock.with_suffix(".in")):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock.name} lacks {requirement} from {image}.in: run python -m scripts.lock_images {image}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} has {name}=={pins[name]}, {image}.in asks {requirement}: run python -m scripts.lock_images"
        )
    # Every entry is one exact version; nothing in an image is left to the day it is built.
    assert all(pins.values())


def test_the_train_key_gets_the_gpu_locks_numerics_versions():
    from modal_jobs.keys import NUMERICS_LIBRARIES

    gpu = locked("gpu")
    pins = modal_app.GPU_IMAGE_PINS
    assert {name: pins[name] for name in NUMERICS_LIBRARIES} == {
        name: gpu[canonicalize_name(name)] for name in NUMERICS_LIBRARIES
    }


def test_every_modal_function_is_checked_here():
    functions = {name for name, value in vars(modal_app).items() if isinstance(value, modal.Function)}
    assert functions == set(modal_app.STAGE_SPECS) | set(OTHER_FUNCTIONS), (
        "a Modal function without a known image: add it to STAGE_SPECS or OTHER_FUNCTIONS"
    )


# --- modules -> distributions ---------------------------------------------------------------------------------


@cache
def _distributions_of_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


# Modules not installed here whose distribution is spelled otherwise (none yet; e.g. "cv2": ["opencv-python"]).
DISTRIBUTIONS_NOT_INSTALLED_HERE: dict[str, list[str]] = {}


def distributions(module: str) -> set[str]:
    """The distributions that may provide a top-level module: from this environment's metadata, else (not
    installed here: unsloth, vllm) DISTRIBUTIONS_NOT_INSTALLED_HERE or the distribution spelled like the module."""
    found = _distributions_of_modules().get(module) or DISTRIBUTIONS_NOT_INSTALLED_HERE.get(module)
    return {canonicalize_name(name) for name in found} if found else {canonicalize_name(module)}


def is_stdlib(module: str) -> bool:
    return module in sys.stdlib_module_names


@dataclass(frozen=True)
class ImportSite:
    module: str  # top-level name
    where: str  # file:line, or the job process that ran it
    guarded: bool = False  # inside a try that catches ImportError


def missing_from_lock(image: str, sites: list[ImportSite]) -> list[str]:
    lock = locked(image)
    problems = []
    for site in sites:
        if site.module == "modal_jobs" or is_stdlib(site.module) or (image, site.module) in ALLOWED_MISSING:
            continue
        if not distributions(site.module) & set(lock):
            guard = " (guarded by try/except ImportError: add it to ALLOWED_MISSING with a reason if that is fine)"
            problems.append(
                f"{site.module} ({' or '.join(sorted(distributions(site.module)))}), imported at {site.where}"
                f"{guard if site.guarded else ''}, is not in {image}.txt"
            )
    return sorted(set(problems))


# --- static: the AST of modal_jobs ---------------------------------------------------------------------------

_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
Node = tuple[str, str]  # (module, top-level function or class name), or (module, "") for the module's own body


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_ERRORS for t in types)


class _ModuleIndex:
    """One modal_jobs module: what each top-level function/class body and the module body import and reference."""

    def __init__(self, name: str):
        self.name = name
        self.path = PACKAGE_DIR / (name.split(".", 1)[1].replace(".", "/") + ".py") if "." in name else (
            PACKAGE_DIR / "__init__.py")
        self.tree = ast.parse(self.path.read_text(), str(self.path))
        self.top = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        # module-level bindings of other modal_jobs modules and their members: alias -> (module, member or "")
        self.bindings: dict[str, Node] = {}
        for statement in self._import_time_nodes():
            if isinstance(statement, ast.ImportFrom):
                source = self._absolute(statement)
                if source.split(".")[0] != "modal_jobs":
                    continue
                for alias in statement.names:
                    submodule = f"{source}.{alias.name}"
                    self.bindings[alias.asname or alias.name] = (
                        (submodule, "") if _is_modal_jobs_module(submodule) else (source, alias.name))
            elif isinstance(statement, ast.Import):
                for alias in statement.names:
                    if alias.name.split(".")[0] == "modal_jobs" and alias.asname:
                        self.bindings[alias.asname] = (alias.name, "")

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self.name.rsplit(".", node.level)[0] if self.path.name != "__init__.py" else self.name
        return f"{package}.{node.module}" if node.module else package

    def _import_time_nodes(self) -> list[ast.AST]:
        """The AST nodes that run when the module is imported: everything but function bodies and the
        `if __name__ == "__main__":` block (a module run as a script is an entry of its own, see SANDBOXES)."""
        found: list[ast.AST] = []

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.If) and _is_main_guard(node.test):
                return
            found.append(node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for part in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
                    if part is not None:
                        visit(part)
                return
            for child in ast.iter_child_nodes(node):
                visit(child)

        for statement in self.tree.body:
            visit(statement)
        return found

    def body_nodes(self, member: str) -> list[ast.AST]:
        if not member:
            return self._import_time_nodes()
        if member == "__main__":  # what `python -m module` runs besides the import
            return [n for s in self.tree.body if isinstance(s, ast.If) and _is_main_guard(s.test) for n in ast.walk(s)]
        return list(ast.walk(self.top[member]))

    def imports_and_edges(self, member: str) -> tuple[list[ImportSite], set[Node]]:
        nodes = self.body_nodes(member)
        guarded_ids = {
            id(inner)
            for node in nodes
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
            for statement in node.body
            for inner in ast.walk(statement)
        }
        sites: list[ImportSite] = []
        edges: set[Node] = set()
        for node in nodes:
            where = f"{self.path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            guarded = id(node) in guarded_ids
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "modal_jobs":
                        edges.add((_module_of(alias.name), ""))
                    else:
                        sites.append(ImportSite(alias.name.split(".")[0], where, guarded))
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(node)
                if source.split(".")[0] != "modal_jobs":
                    sites.append(ImportSite(source.split(".")[0], where, guarded))
                    continue
                edges.add((_module_of(source), ""))
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    edges.add((submodule, "") if _is_modal_jobs_module(submodule) else (_module_of(source), alias.name))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value  # importlib.import_module("literal")
                if name.split(".")[0] == "modal_jobs":
                    edges.add((_module_of(name), ""))
                else:
                    sites.append(ImportSite(name.split(".")[0], where, guarded))
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id in self.top and node.id != member:
                    edges.add((self.name, node.id))
                elif node.id in self.bindings:
                    edges.add(self.bindings[node.id])
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                bound = self.bindings.get(node.value.id)
                if bound and not bound[1]:  # modal_jobs_module.member
                    edges.add((bound[0], node.attr))
        edges.add((self.name, ""))  # a member runs only once its module has been imported
        return sites, edges


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _is_modal_jobs_module(name: str) -> bool:
    relative = name.split(".", 1)[1] if "." in name else ""
    return name == "modal_jobs" or (PACKAGE_DIR / f"{relative.replace('.', '/')}.py").is_file()


def _module_of(name: str) -> str:
    return name if _is_modal_jobs_module(name) else name.rsplit(".", 1)[0]


@cache
def _index(module: str) -> _ModuleIndex:
    return _ModuleIndex(module)


def static_reach(entries: list[Node]) -> tuple[set[Node], list[ImportSite]]:
    """Every (module, member) reachable from the entries, and the third-party imports they execute."""
    seen: set[Node] = set()
    sites: list[ImportSite] = []
    todo = list(entries)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        module, member = node
        index = _index(module)
        if member and member not in index.top and member != "__main__":
            continue  # a constant or a re-exported name, not code
        seen.add(node)
        found, edges = index.imports_and_edges(member)
        sites += found
        todo += [edge for edge in edges if edge not in seen]
    return seen, sites


def static_entries(function: str) -> list[Node]:
    """What a Modal function runs: its body in modal_jobs.app and, for a stage function that runs its job through
    run_stage (-> jobs.run_job, which imports the job module by name), the stage's job function."""
    entries: list[Node] = [("modal_jobs.app", ""), ("modal_jobs.app", function)]
    reached, _ = static_reach(entries)
    if ("modal_jobs.app", "run_stage") in reached:
        module, job, _, _ = JOBS[function]
        entries.append((module, job))
    return entries


def runs_its_job(function: str) -> bool:
    """Whether a stage's Modal function runs the same job the local executor runs (so the CPU run shows its
    imports); `serve` on Modal starts a vLLM Sandbox instead of a local server."""
    return ("modal_jobs.app", "run_stage") in static_reach(static_entries(function))[0]


def checked_functions() -> list[tuple[str, str]]:
    return [(name, image_of(name)) for name in [*modal_app.STAGE_SPECS, *OTHER_FUNCTIONS]]


@pytest.mark.parametrize("function,image", checked_functions())
def test_static_imports_of_each_modal_function_are_in_its_lock(function, image):
    _, sites = static_reach(static_entries(function))
    assert missing_from_lock(image, sites) == []


@pytest.mark.parametrize("sandbox", list(SANDBOXES))
def test_static_imports_of_each_sandbox_are_in_its_lock(sandbox):
    image, modules = SANDBOXES[sandbox]
    entries = [(module, member) for module in modules for member in ["", "__main__", *_index(module).top]]
    _, sites = static_reach(entries)
    assert missing_from_lock(image, sites) == []


@pytest.mark.parametrize("image", list(EXECUTABLES))
def test_the_executables_an_image_runs_are_in_its_lock(image):
    for executable, distribution in EXECUTABLES[image].items():
        assert canonicalize_name(distribution) in locked(image), f"{image} runs `{executable}` ({distribution})"


def test_the_static_view_follows_calls_not_whole_modules():
    """The AST view must not be so coarse that it demands everything everywhere: modal_jobs.jobs imports the
    consistency module for its request type, which must not make Unsloth or openai a CPU stage's import."""
    reached, sites = static_reach(static_entries("prepare_dataset"))
    assert ("modal_jobs.dataset", "prepare_dataset") in reached
    assert ("modal_jobs.consistency", "") in reached and ("modal_jobs.consistency", "consistency") not in reached
    assert {s.module for s in sites}.isdisjoint({"unsloth", "openai", "peft", "trl"})
    _, train_sites = static_reach(static_entries("train"))
    assert "unsloth" in {s.module for s in train_sites}
    # serve._cuda_available's `try: import torch / except ImportError` is seen as optional.
    _, serve_sites = static_reach([("modal_jobs.serve", "_cuda_available")])
    assert [s.guarded for s in serve_sites if s.module == "torch"] == [True]


# --- dynamic: one embedded run, every job process recording its imports ---------------------------------------

RECORDER = '''
"""Records, per job process, each import statement that modal_jobs code executes (test_modal_images)."""
import builtins, os, sys, threading

_log_dir = os.environ.get("VLMPIPE_IMPORT_LOG")
if _log_dir:
    _original_import = builtins.__import__
    _seen = set()
    _lock = threading.Lock()

    def _record(name, globals, level):
        globals = globals or {}
        importer = globals.get("__name__") or ""
        spec = globals.get("__spec__")
        if importer == "__main__" and spec is not None:
            importer = spec.name
        if not importer.startswith("modal_jobs"):
            return
        top = "modal_jobs" if level else name.split(".")[0]
        stage = sys.argv[1] if len(sys.argv) > 1 and sys.argv[0].endswith(os.path.join("modal_jobs", "runner.py")) else "-"
        key = (stage, importer, top)
        with _lock:
            if key in _seen:
                return
            _seen.add(key)
            with open(os.path.join(_log_dir, f"{os.getpid()}.tsv"), "a") as log:
                log.write("\\t".join(key) + "\\n")

    def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        module = _original_import(name, globals, locals, fromlist, level)
        try:
            _record(name, globals, level)
        except Exception:
            pass
        return module

    builtins.__import__ = _recording_import
'''

# Small enough to run in well under a minute on 2 cores, and still every stage: data rendered with matplotlib,
# the tiny model built, images encoded, two optimizer steps, the merge, a real server, the check, two evaluations.
EMBEDDED_RUN = [
    "dataset.synthetic.train_size=16", "dataset.synthetic.test_size=4", "train.max_steps=2",
    "evaluate.num_samples=2", "evaluate.bootstrap_resamples=0",
]


@whole_run
def recorded_imports(root: Path) -> dict[str, list[ImportSite]]:
    """A fresh embedded run with the recorder on every process's path: what each stage's job imported."""
    recorder_dir, log_dir = root / "recorder", root / "log"
    recorder_dir.mkdir()
    log_dir.mkdir()
    (recorder_dir / "sitecustomize.py").write_text(textwrap.dedent(RECORDER))
    env = {
        **whole_runs.ENVIRON, "VLMPIPE_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect"),
        "HF_HUB_OFFLINE": "1", "VLMPIPE_IMPORT_LOG": str(log_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(recorder_dir), str(REPO), whole_runs.ENVIRON.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "flows.cli", "run", "--json", *(f"--set={s}" for s in EMBEDDED_RUN)]
    done = whole_runs.run(command, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    stages = json.loads(done.stdout.strip().splitlines()[-1])["stages"]
    assert all(stage["state"] == "Completed" for stage in stages.values()), stages
    recorded: dict[str, list[ImportSite]] = defaultdict(list)
    for log in log_dir.glob("*.tsv"):
        for line in log.read_text().splitlines():
            stage, importer, module = line.split("\t")
            recorded[stage].append(ImportSite(module, f"{importer} in the {stage} job"))
    return recorded


@pytest.mark.integration
def test_the_recorder_sees_each_stage_run(recorded_imports):
    assert set(JOBS) <= set(recorded_imports), sorted(recorded_imports)
    assert "jiwer" in {site.module for site in recorded_imports["evaluate"]}


@pytest.mark.integration
@pytest.mark.parametrize("function,image", [(f, i) for f, i in checked_functions() if f in JOBS])
def test_imports_of_each_stages_job_run_are_in_its_lock(recorded_imports, function, image):
    if not runs_its_job(function):
        pytest.skip(f"the {function} Modal function does not run the local job (checked statically above)")
    assert missing_from_lock(image, recorded_imports[function]) == []
