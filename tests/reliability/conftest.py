import sys
from pathlib import Path

# nwstack (process helpers) lives in tests/security; tests run with --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
