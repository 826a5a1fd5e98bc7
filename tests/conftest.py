import sys
from pathlib import Path

# test helpers (synthetic scenes) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))
