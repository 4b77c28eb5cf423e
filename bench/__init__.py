"""Benchmarks: ``python -m bench`` measures the kit against a plain Gradio app."""
