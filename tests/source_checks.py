"""Static checks of the project's source, shared by tests (kept free of heavy imports so that
a test can run them in a fresh interpreter)."""

from __future__ import annotations

import ast

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Loading calls in `source` that could unpickle: pickle-family imports, np.load without
    allow_pickle=False, torch.load without weights_only=True, any allow_pickle=True."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in PICKLE_MODULES for n in names):
                problems.append(f"line {node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}

        def is_const(name, value, keywords=keywords):
            return isinstance(keywords.get(name), ast.Constant) and keywords[name].value is value

        func = ast.unparse(node.func)
        if "allow_pickle" in keywords and not is_const("allow_pickle", False):
            problems.append(f"line {node.lineno}: {func}(allow_pickle=...) not False")
        if func in ("np.load", "numpy.load", "jnp.load") and not is_const("allow_pickle", False):
            problems.append(f"line {node.lineno}: {func} without allow_pickle=False")
        if func == "torch.load" and not is_const("weights_only", True):
            problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        if func.split(".")[0] in PICKLE_MODULES or "pickle" in func.split(".")[-1]:
            problems.append(f"line {node.lineno}: {func}")
    return problems
