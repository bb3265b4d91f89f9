"""tests/engine: the round loop's Flower-free parts; helpers in callback_harness.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
