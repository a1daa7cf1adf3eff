"""``modeling_smoe.py``: smoe's torch-only model modules as the one file an exported directory runs.

The exported model is not a second implementation: the file is the training's own router,
expert, dispatch, Transformer-XL and encoder code (:data:`PORTABLE`), module after module, with
the imports between them taken out. Each of those modules may import only the standard
library, torch, transformers and the modules before it; :func:`bundle` refuses anything else,
and two modules defining one name, so the file is importable on its own.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import smoe

MODELING_FILE = "modeling_smoe.py"
MODELING_MODULE = MODELING_FILE.removesuffix(".py")  # what config.json's auto_map names
# In dependency order: each imports from smoe only what an earlier one defines.
PORTABLE = ("smoe.routing.routers", "smoe.model.mlp", "smoe.model.dispatch", "smoe.model.mixture",
            "smoe.model.transformer_xl", "smoe.model.encoder", "smoe.model.hub")
THIRD_PARTY = {"torch", "transformers"}
ROOT = Path(smoe.__file__).resolve().parent


def source_file(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _bundled_lines(module: str, defined: set[str]) -> list[str]:
    """The module's source without ``from __future__`` and its imports of earlier bundled modules."""
    path = source_file(module)
    text = path.read_text()
    tree = ast.parse(text)
    dropped = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        top = (node.module or "" if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
        if top == "__future__" or top == "smoe":
            if node not in tree.body:
                raise ValueError(f"{path}: an import inside a function ({ast.unparse(node)}) cannot be bundled")
            if top == "smoe":
                missing = [a.name for a in node.names if a.name not in defined] if isinstance(node, ast.ImportFrom) \
                    else [a.name for a in node.names]
                if missing:
                    raise ValueError(f"{path} imports {missing} from smoe, which no earlier module of "
                                     f"PORTABLE defines")
            dropped |= set(range(node.lineno, node.end_lineno + 1))
        elif top not in THIRD_PARTY and top not in sys.stdlib_module_names:
            raise ValueError(f"{path} imports {top}: an exported model may need only torch and transformers")
    return [line for number, line in enumerate(text.splitlines(), 1) if number not in dropped]


def bundle() -> str:
    """The text of ``modeling_smoe.py``."""
    defined: set[str] = set()
    parts = [f'"""SMoE-Dropout models for transformers, written by `smoe export` (smoe {smoe.__version__}).\n\n'
             "The modules of smoe named in each section, copied: load with trust_remote_code=True.\n"
             '"""\n\nfrom __future__ import annotations\n']
    for module in PORTABLE:
        names = _top_level_names(ast.parse(source_file(module).read_text()))
        lines = _bundled_lines(module, defined)
        clash = sorted(names & defined)
        if clash:
            raise ValueError(f"{source_file(module)} defines {clash} again: rename them to bundle it")
        defined |= names
        parts.append(f"\n# {'-' * 30} {module} {'-' * 30}\n\n" + "\n".join(lines).strip("\n") + "\n")
    return "\n".join(parts)


def import_modeling(path: Path):
    """The bundled modelling file at ``path`` as a module, to build the exported classes in this process."""
    name = f"smoe_export_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
