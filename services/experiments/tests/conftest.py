import sys
from pathlib import Path

# Make `neuroweaver_experiments` importable without installing the package.
_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))
