"""The data path depends on numpy, scipy and numba only at import (torch lazily)."""

import ast
from pathlib import Path

import scvi_fast.data

ALLOWED_TOP_LEVEL = {"__future__", "numpy", "scipy", "numba", "copy", "gzip", "json", "math",
                     "mmap", "os", "pathlib", "queue", "shutil", "sys", "threading", "typing",
                     "uuid", "zlib", "dataclasses"}


def test_module_level_imports_are_light():
    pkg = Path(scvi_fast.data.__file__).parent
    for path in sorted(pkg.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative imports stay inside the package
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED_TOP_LEVEL, f"{path.name} imports {name} at module level"
