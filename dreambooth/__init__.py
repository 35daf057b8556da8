"""DreamBooth for Stable Diffusion: the trainer, checkpoint I/O and the WebUI tab. Nothing here imports the webui."""

__version__ = "0.1.0"
