"""Helpers for tests that need a real ComfyUI: host fixture, pack import, SD1.5 checkpoint, adapters."""
