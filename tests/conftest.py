import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# fixtures for tests inside a real ComfyUI (they skip cleanly when it is absent)
from host.fixtures import (comfy_host, loras_dir, lycoris_pack, originals, quiet_warnings,  # noqa: E402,F401
                           sd15, sd15_checkpoint)
