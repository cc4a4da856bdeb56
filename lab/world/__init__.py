"""The proving ground's world: a small text-to-image diffusion model trained on procedural images, its fine-tunes
(DreamBooth style and LoRA) and the similarity descriptors that score extraction at 32x32.

Plain PyTorch/NumPy: nothing here imports ComfyUI (lab/nodes.py wraps the world as a ComfyUI MODEL).
"""
