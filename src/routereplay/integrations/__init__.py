"""Trainer-side adapters: each connects one framework's routers to a ReplayController.

Adapters import their framework lazily (or not at all), so the core installs alone.
"""
