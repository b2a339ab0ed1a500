import pathlib
import sys

# Tests run from a clean checkout too (before `pip install -e .`), so the repo root is importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
