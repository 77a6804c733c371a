"""Print the ComfyUI hosts present, one a line (`--paths`: paths only), for .ci/run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from host.host import host_paths, label  # noqa: E402

for path in host_paths():
    print(path if "--paths" in sys.argv else label(path))
