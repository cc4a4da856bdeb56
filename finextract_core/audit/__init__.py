"""finextract-audit: many models against a folder of references, through a real ComfyUI server (command.py), into one
index (index.py); the prompts it queues (workflow.py) and the memorisation pre-screen's measure (prescreen.py)."""
