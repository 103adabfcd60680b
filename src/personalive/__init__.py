"""PersonaLive: diffusion-based portrait animation that is real-time, streamable and of unlimited length."""

__version__ = "0.1.0"
