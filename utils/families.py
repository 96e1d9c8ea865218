"""The model families the project knows, by the key files record (latents, reward models, LoRA state)."""

FAMILY_NAMES = {"sd15": "SD1.x", "sdxl": "SDXL"}
