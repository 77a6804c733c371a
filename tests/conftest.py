import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# fixtures for tests inside a real ComfyUI (they skip cleanly when it is absent)
from host.fixtures import (comfy_host, gguf_unet, loras_dir, lycoris_pack, originals,  # noqa: E402,F401
                           quiet_warnings, sd15, sd15_checkpoint)
