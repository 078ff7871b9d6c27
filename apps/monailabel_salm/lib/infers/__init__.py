"""Inference tasks of the monai-salm MONAI Label app.

``salm_core`` holds the protection logic and never imports ``monailabel``; ``salm_protect`` wraps it as the
``salm_protect`` MONAI Label task.
"""

from .salm_protect import SALMProtect

__all__ = ["SALMProtect"]
