"""FineXtract's algorithms in plain PyTorch / NumPy / SciPy.

Nothing here imports ComfyUI: the pack's nodes (``nodes/``) adapt ComfyUI types to these functions, and the
functions are tested on their own.
"""

__version__ = "0.1.0"
