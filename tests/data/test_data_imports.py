"""The data floor's third-party imports: its own dependencies at module top, others lazily.

data depends on numpy, scipy, numba, pandas, h5py and anndata (and the standard library) and
imports them at the top of its modules. A package outside that set is imported only inside the
function that needs it. Where the package itself imports (floors, cycles) is checked by
tests/test_import_layers.py.
"""

import ast
import sys
from pathlib import Path

import scvi_fast.data

DEPENDENCIES = {"numpy", "scipy", "numba", "pandas", "h5py", "anndata"}
#: outside the data floor's dependencies: only inside the function that needs them
LAZY_ONLY = {
    "torch": "handing a minibatch to torch (CSRMinibatch.to, TorchMinibatch)",
    "skmisc": "scanpy's loess for HVG selection, optional (the hvg extra)",
    "google_crc32c": "hardware CRC-32C for the store's chunk checksums, optional (numba fallback)",
}
#: imports inside functions that belong at the top of their module: (file, module) -> why
ALLOWED_LAZY = {
    ("_loader.py", "numba"): "the loader's thread count; numba is imported at the top anyway",
    ("_synthetic.py", "anndata"): "synthetic_anndata; from when data avoided anndata at import",
    ("_synthetic.py", "pandas"): "synthetic_anndata; from when data avoided pandas at import",
    ("_synthetic.py", "scipy.sparse"): "synthetic data; from when data avoided scipy at import",
    ("_synthetic.py", "._convert"): "write_synthetic_store's StoreWriter; no cycle, only lazy",
}

PKG = Path(scvi_fast.data.__file__).parent


def _imports(tree):
    """``(module name, line, inside a function)`` of every import in ``tree``."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.append(("." * child.level + (child.module or ""), child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def test_module_level_imports_are_the_dependencies_and_lazy_ones_are_optional():
    problems, seen_lazy = [], set()
    for path in sorted(PKG.glob("*.py")):
        for name, line, lazy in _imports(ast.parse(path.read_text())):
            root = name.split(".")[0]
            # the package's own modules: where they may be imported from is the layer test's
            internal = name.startswith(".") or root == "scvi_fast"
            where = f"scvi_fast/data/{path.name}:{line}: {name}"
            if name == "__future__":
                continue
            if root in LAZY_ONLY:
                if not lazy:
                    problems.append(f"{where} at module level; import it in the function that "
                                    f"needs it ({LAZY_ONLY[root]})")
            elif not (internal or root in DEPENDENCIES or root in sys.stdlib_module_names):
                problems.append(f"{where}: not a dependency of the data floor "
                                f"({sorted(DEPENDENCIES)} and the standard library)")
            elif lazy:
                key = (path.name, name)
                if key in ALLOWED_LAZY:
                    seen_lazy.add(key)
                else:
                    problems.append(f"{where} inside a function; import it at the top of the "
                                    "module (only optional packages are imported lazily)")
    problems += [f"{f} no longer imports {m} inside a function: remove it from ALLOWED_LAZY"
                 for f, m in ALLOWED_LAZY if (f, m) not in seen_lazy]
    assert not problems, "\n".join(problems)
