"""The package's structure: three wings whose imports run one way (hf -> pruning -> ops),
the lower two free of transformers, and policies known by class, never by a name compared
as a string outside the registry."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Iterator, List, Tuple

import cspkv

PACKAGE = os.path.dirname(os.path.abspath(cspkv.__file__))
ROOT = os.path.dirname(PACKAGE)
# Each wing may import itself and the wings after it.
WINGS = ("hf", "pruning", "ops")


def _sources(folder: str) -> Iterator[str]:
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path: str) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _wing(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cspkv" and parts[1] in WINGS else None


def test_imports_run_one_way_and_lower_wings_never_import_transformers():
    problems = []
    for wing in WINGS:
        allowed = WINGS[WINGS.index(wing):]
        for path in _sources(os.path.join(PACKAGE, wing)):
            for line, name in _imports(path):
                where = f"{os.path.relpath(path, ROOT)}:{line}"
                if wing != "hf" and (name == "transformers" or name.startswith("transformers.")):
                    problems.append(f"{where} imports {name} (the {wing} wing must work without transformers)")
                target = _wing(name)
                if target is not None and target not in allowed:
                    problems.append(f"{where} imports {name}: cspkv.{wing} may import only {', '.join(allowed)}")
    assert not problems, "\n".join(problems)


def test_ops_and_pruning_work_without_transformers():
    """With transformers unimportable, the ops and the pruning run; the patch API says what is missing."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, cspkv\n"
        "from cspkv.pruning import plan_batch, prune_layer, window_query_ids\n"
        "k_mod = torch.zeros(1, 64, dtype=torch.int32); config = cspkv.CSPConfig(budget=16)\n"
        "plans = plan_batch(config, k_mod); q_mod = window_query_ids(k_mod, plans)\n"
        "q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)\n"
        "kept = prune_layer(config, q, k, k.clone(), k_mod, q_mod, plans, scale=0.35)\n"
        "assert kept.keys.shape == (1, 2, 16, 8), kept.keys.shape\n"
        "assert 'transformers' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
        "try:\n    cspkv.patch(None)\nexcept ImportError as exc:\n    assert 'needs transformers' in str(exc)\n"
        "else:\n    raise AssertionError('cspkv.patch ran without transformers')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr[-3000:]


def _compared_strings(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """String constants that take part in ==, !=, in, not in comparisons."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                for element in elements:
                    if isinstance(element, ast.Constant) and isinstance(element.value, str):
                        yield node.lineno, element.value


def test_no_policy_name_is_compared_as_a_string_outside_the_registry():
    names = set(cspkv.registered_policies())
    registry = os.path.join(PACKAGE, "pruning", "policies", "base.py")
    problems = []
    for folder in (PACKAGE, os.path.join(ROOT, "benchmarks")):
        for path in _sources(folder):
            if path == registry:
                continue
            for line, value in _compared_strings(ast.parse(open(path).read(), path)):
                if value in names:
                    problems.append(f"{os.path.relpath(path, ROOT)}:{line} compares with the policy name {value!r}")
    assert not problems, "\n".join(problems)
