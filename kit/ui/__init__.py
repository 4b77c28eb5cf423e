"""Gradio widgets and event wiring. No model code lives here."""
