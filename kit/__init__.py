"""Microsite Kit: a preset file in, a public Gradio microsite for a diffusion model out."""

__version__ = "0.1.0"
