"""The lab: FineXtract's demo world and proving ground, apart from the node pack users install.

A small trained text-to-image world (``world/``), its ComfyUI nodes (``nodes.py``: World Loader, Text Encode, Decode,
Embed), the proving ground and the demo runner. ComfyUI loads the lab as a custom node of its own only where the
development host or the main job link it in, from a custom_nodes folder scanned after the pack's, so users never see
its nodes. Nothing is imported here: the lab's plain PyTorch parts import without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import LabExtension

    return LabExtension()
